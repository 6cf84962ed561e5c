import itertools

import numpy as np
import pytest
import torch

from modnets.circuits import (
    GATES,
    MULTITASK,
    PRESETS,
    bits,
    default_gates,
    default_widths,
    joint_library,
    layer_outputs,
    random_circuit,
)
from modnets.config import ConfigError
from modnets.tasks import RandomCircuitTask

CASES = [
    (8, [4, 2, 2], 2),
    (12, [4, 4, 2], 3),
    (16, [8, 4, 4, 2, 2], 2),
    (40, [8, 8, 8, 8, 2], 5),
    (100, [32, 16, 8, 4, 2, 2], 2),
]


def reachable(c):
    """Per layer, the modules an output reaches by following gate inputs backwards."""
    reach = [set() for _ in c.layers]
    reach[-1] = set(c.outputs)
    for i in range(len(c.layers) - 1, 0, -1):
        reach[i - 1] = {u for m in reach[i] for u in c.layers[i][m].inputs}
    return reach


def rows_of(n, count=4096, seed=123):
    if n <= 12:
        return bits(np.arange(2**n), n)
    return np.random.default_rng(seed).integers(0, 2, size=(count, n), dtype=np.uint8)


def test_k_ary_gates():
    b = np.array(list(itertools.product([0, 1], repeat=3)), dtype=np.uint8)
    ones = b.sum(1)
    assert (GATES["MAJ"](b) == (ones >= 2)).all()
    assert (GATES["PARITY"](b) == ones % 2).all() and (GATES["XOR"](b) == ones % 2).all()
    assert (GATES["TH1"](b) == GATES["OR"](b)).all() and (GATES["TH3"](b) == GATES["AND"](b)).all()
    assert (GATES["NAND"](b).astype(int) == 1 - (ones == 3)).all()
    assert default_gates(2) == ["AND", "OR", "XOR", "NAND", "NOR", "XNOR"]
    assert default_gates(3) == [*default_gates(2), "MAJ"]  # TH2 of 3 inputs is majority
    assert default_gates(5) == [*default_gates(2), "MAJ", "TH2", "TH4"]


@pytest.mark.parametrize("n,widths,k", CASES)
def test_same_seed_same_circuit_other_seed_other_circuit(n, widths, k):
    a, b, c = random_circuit(n, widths, k, seed=7), random_circuit(n, widths, k, seed=7), random_circuit(n, widths, k, seed=8)
    assert a == b and a != c
    assert a.modularity == [n, *widths, widths[-1]] and a.arity == k


@pytest.mark.parametrize("n,widths,k", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_module_reachable_and_nothing_constant(n, widths, k, seed):
    c = random_circuit(n, widths, k, seed=seed)
    assert [len(r) for r in reachable(c)] == widths  # every module of every layer feeds an output
    assert all(len(set(g.inputs)) == k for layer in c.layers for g in layer)
    if widths[0] * k >= n:  # the first layer reads every input bit when it has room
        assert {u for g in c.layers[0] for u in g.inputs} == set(range(n))
    x = rows_of(n)  # other rows than the generator's check (for n > 12): a fresh sample
    outs = layer_outputs(c, x)
    for h in outs:
        assert (h.min(0) == 0).all() and (h.max(0) == 1).all()  # no module, hence no output, is constant
    for i, layer in enumerate(c.layers):  # inverting any module changes some output
        for j in range(len(layer)):
            assert not np.array_equal(layer_outputs(c, x, (i, j))[-1], outs[-1]), (i, j)


@pytest.mark.parametrize("n,widths,k", [(8, [4, 2, 2], 2), (12, [4, 4, 2], 3), (9, [3, 3, 2], 3)])
@pytest.mark.parametrize("seed", range(6))
def test_no_two_modules_of_a_layer_compute_one_function(n, widths, k, seed):
    # gate names are not functions: on dependent units two gates can agree (9 inputs, 3-input
    # gates, seed 0 once had two outputs computing one function, an output task that was one task)
    c = random_circuit(n, widths, k, seed=seed)
    outs = layer_outputs(c, rows_of(n))  # the whole truth table
    for h in outs:
        assert len({col.tobytes() for col in h.T}) == h.shape[1]
    last = outs[-1].astype(np.uint8)
    assert len({min(col.tobytes(), (1 - col).tobytes()) for col in last.T}) == last.shape[1]  # nor negations


def test_modules_of_one_gate_type_share_a_library_module():
    c = random_circuit(12, [4, 4, 2], 3, seed=0)
    assert set(c.library) <= set(default_gates(3))
    for layer, slots in zip(c.layers, c.slots):
        assert [c.library[s] for s in slots] == [g.op for g in layer]


def test_joint_library_indexes_every_task_into_one_library():
    library, slots = joint_library(MULTITASK)
    assert library == ["XOR", "AND", "OR"]
    assert slots[0] == [[0, 0, 0], [1, 1]]
    assert slots[1] == [[2, 2, 2], [1, 1]]
    assert slots[2] == [[2, 0, 0, 2], [1, 1]]
    single = PRESETS[(6, 3, 3, 2, 2)]
    assert joint_library([single]) == (single.library, [single.slots])


def test_default_widths_let_every_module_be_read():
    assert default_widths(6, 2, 2, 2) == [3, 2]
    assert default_widths(8, 5, 2, 2) == [4, 4, 4, 4, 2]
    assert default_widths(100, 3, 2, 2) == [8, 4, 2]
    for n, d, k in itertools.product([6, 9, 32], [1, 2, 5], [2, 3]):
        w = default_widths(n, d, 2, k)
        assert len(w) == d and w[-1] == 2 and all(a <= k * b for a, b in zip(w, w[1:]))


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"widths": [4, 1, 2]}, "task.widths"),  # layer 3 cannot read 2 distinct of 1 module
        ({"widths": [6, 2]}, "task.widths"),  # two 2-input gates cannot read six modules
        ({"widths": [4, 0]}, "task.widths"),
        ({"gates": ["AND", "NOPE"]}, "task.gates"),
        ({"gates": ["MAJ"]}, "task.gates"),  # majority needs more than 2 inputs
        ({"arity": 3, "gates": ["TH4"]}, "task.gates"),
        ({"n_inputs": 30}, "task.samples"),  # 2^30 rows cannot be enumerated
        ({"gates": ["AND"], "widths": [4, 4, 4, 2], "arity": 2, "n_inputs": 8}, "task.circuit_seed"),  # always near-constant
    ],
)
def test_bad_generator_settings_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        RandomCircuitTask(**{"n_inputs": 8, "widths": [4, 2], **kwargs})


def test_full_table_in_product_order_up_to_20_inputs():
    task = RandomCircuitTask(n_inputs=10, depth=3)
    assert task.x.tolist() == [list(r) for r in itertools.product([0, 1], repeat=10)]
    c = task.circuits[0]
    assert torch.equal(task.y, torch.from_numpy(c.evaluate(task.x.numpy().astype(np.uint8))).float())
    assert task.modularity == [10, 5, 4, 2, 2]


@pytest.mark.parametrize("n,samples", [(14, 3000), (24, 3000), (100, 5000)])
def test_sampled_rows_are_distinct_and_splits_disjoint(n, samples):
    task = RandomCircuitTask(n_inputs=n, depth=4, samples=samples, split_seed=3)
    assert task.x.shape == (samples, n)
    s = task.splits
    assert sorted(torch.cat([s["train"], s["val"], s["test"]]).tolist()) == list(range(samples))
    inputs = {name: {tuple(r) for r in task.x[s[name]].int().tolist()} for name in ("train", "val", "test")}
    assert sum(map(len, inputs.values())) == samples  # no input occurs twice, so no input is in two splits
    assert not inputs["train"] & (inputs["val"] | inputs["test"])
    assert len(s["train"]) == int(samples * 0.8)
    y = task.y
    assert ((y.min(0).values == 0) & (y.max(0).values == 1)).all()
    again = RandomCircuitTask(n_inputs=n, depth=4, samples=samples, split_seed=3)
    assert torch.equal(task.x, again.x) and torch.equal(task.splits["val"], again.splits["val"])
    other = RandomCircuitTask(n_inputs=n, depth=4, samples=samples, split_seed=4)
    assert not torch.equal(task.x, other.x)
