import itertools
import json

import numpy as np
import pytest
import torch

from modnets.config import ConfigError
from modnets.models import MLP, ModularNet
from modnets.routers import Learned
from modnets.tasks import MultiTask, RandomCircuitTask
from modnets.train import Evaluator, build, fit, run

KNOWN = Learned(known_inputs=True, known_outputs=True, known_locations=True)


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def spec_tables():
    """spec §1 multi-task set, written out by hand."""
    x = np.array(list(itertools.product([0, 1], repeat=6)))
    XOR, OR, AND = np.bitwise_xor, np.bitwise_or, np.bitwise_and
    f = [XOR(x[:, 0], x[:, 1]), XOR(x[:, 2], x[:, 3]), XOR(x[:, 4], x[:, 5])]
    return x, [
        np.stack([AND(f[0], f[1]), AND(f[1], f[2])], 1),
        np.stack([AND(OR(x[:, 0], x[:, 2]), OR(x[:, 3], x[:, 4])), AND(OR(x[:, 1], x[:, 5]), OR(x[:, 3], x[:, 4]))], 1),
        np.stack([AND(OR(x[:, 0], x[:, 2]), XOR(x[:, 4], x[:, 5])), AND(XOR(x[:, 0], x[:, 1]), OR(x[:, 3], x[:, 4]))], 1),
    ]


@pytest.mark.parametrize("tasks", [[0, 1, 2], [0, 2]])
def test_multitask_truth_tables_match_spec(tasks):
    task = MultiTask(tasks)
    x, tables = spec_tables()
    assert task.n_tasks == len(tasks) and task.x.shape == (64 * len(tasks), 6)
    for t, which in enumerate(tasks):
        rows = task.task_id == t
        assert task.x[rows].tolist() == x.tolist()
        assert task.y[rows].int().numpy().tolist() == tables[which].tolist(), which
    assert task.modularity == [6, 4, 2, 2]  # task 2 needs four first-layer gates
    assert MultiTask([0, 1]).modularity == [6, 3, 2, 2]


def test_per_task_splits_are_each_tasks_rows_split_the_same_way():
    task = MultiTask([0, 1, 2])
    s = task.splits
    for t in range(3):
        rows = set(torch.nonzero(task.task_id == t).flatten().tolist())
        train, held = set(s[f"task{t}_train"].tolist()), set(s[f"task{t}_heldout"].tolist())
        assert train | held == rows and not train & held
        assert torch.equal(s[f"task{t}_train"] - 64 * t, s["task0_train"])  # the same split in every task
    assert sorted(s["heldout"].tolist()) == sorted(sum((s[f"task{t}_heldout"].tolist() for t in range(3)), []))


@pytest.mark.parametrize("tasks", [[], [0, 0], [3], [-1, 1]])
def test_bad_task_set_is_a_config_error(tasks):
    with pytest.raises(ConfigError, match="task.tasks"):
        MultiTask(tasks)


def test_mlp_reads_the_task_as_one_hot():
    task = MultiTask()
    model = MLP(task, None, gens(0), hidden=[8])
    assert model.net.weights[0].shape[2] == 6 + 3
    x = task.x[:4].expand(1, -1, -1)
    outs = [model(x, torch.full((1, 4), t)) for t in range(3)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_known_routing_is_each_tasks_ground_truth():
    task = MultiTask()
    model = ModularNet(task, KNOWN, gens(0), shared=True)
    s = model.routing_summary()[0]
    for t, c in enumerate(task.circuits):
        for layer, truth in zip(s["inputs"], c.routing):
            assert [sorted(m) for m in layer[t][: len(truth)]] == truth
        assert s["outputs"][t] == list(c.outputs)
    # one library (XOR, AND, OR) for all tasks: task 1's ORs use another module than task 0's XORs
    assert s["locations"][0][0][:3] == [0, 0, 0] and s["locations"][0][1][:3] == [2, 2, 2]
    assert s["locations"][1] == [[1, 1], [1, 1], [1, 1]]


def test_known_routing_without_shared_modules_needs_one_gate_per_slot():
    """Slot 0 of layer 1 is an XOR in task 0 and an OR in task 1: one module cannot be both."""
    with pytest.raises(ConfigError, match="model.shared"):
        ModularNet(MultiTask(), KNOWN, gens(0))
    ModularNet(MultiTask(), Learned(known_outputs=True), gens(0))  # learned inputs: allowed


@pytest.mark.parametrize("shared", [False, True])
def test_router_rows_get_gradients_only_from_their_task(shared):
    task = MultiTask()
    model = ModularNet(task, Learned(), gens(0), shared=shared)
    rows = torch.nonzero(task.task_id == 1).flatten()[:16]
    out = model(task.x[rows][None], task.task_id[rows][None])
    torch.nn.functional.binary_cross_entropy_with_logits(out, task.y[rows][None]).backward()
    routers = [*model.routers, model.output_router, *(model.locations if shared else [])]
    for r in routers:
        g = r.logits.grad[0]  # [tasks, choices, consumers]
        assert g[1].abs().sum() > 0 and g[0].abs().sum() == 0 and g[2].abs().sum() == 0
    banks = [model.bank] if shared else list(model.banks)
    for bank in banks:  # module weights have no task dimension: one set serves every task
        assert all(w.dim() == 4 and w.grad.abs().sum() > 0 for w in bank.weights)


def test_per_task_routers_differ_after_training_while_modules_are_shared(cfg_in):
    cfg = cfg_in("experiment=multitask", "trainer.epochs=15", "trainer.batch_size=16")
    b = build(cfg)
    routers = [r for r in b.model.modules() if hasattr(r, "selection")]
    with torch.no_grad():  # every task starts from the same routing
        for r in routers:
            r.logits[:] = r.logits[:, :1].clone()
    before = {name: p.detach().clone() for name, p in b.model.named_parameters()}
    fit(cfg, b.task, b.model, b.optimizer, b.scheduler, b.generators, Evaluator(b.task, 1024), lambda e, m: None)
    for r in routers:
        logits = r.logits.detach()[0]
        assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[1], logits[2])
    selections = [r.selection()[0] for r in routers]  # the noise-free routing of tasks 0, 1, 2
    assert any(not torch.equal(s[0], s[1]) for s in selections)
    assert any(not torch.equal(s[1], s[2]) for s in selections)
    bank = dict(b.model.named_parameters())
    modules = [n for n in bank if n.startswith("bank.")]
    assert modules and all(bank[n].shape[:2] == (1, 3) for n in modules if "weights" in n)  # [R, library, in, out]
    assert all(not torch.equal(before[n], bank[n]) for n in modules)


def test_known_routing_learns_every_task_with_shared_modules(cfg_in):
    final = run(cfg_in("experiment=multitask_known", "trainer.epochs=150", "trainer.batch_size=8"))[0]["final"]
    for t in range(3):
        assert final[f"task{t}_heldout_acc"] == pytest.approx(1.0, abs=1e-5), final
    assert final["heldout_exact"] == pytest.approx(1.0, abs=1e-5)


def test_k3_known_routing_on_a_generated_circuit(cfg_in):
    overrides = ["task=bool_random", "task.n_inputs=9", "task.widths=[3,3,2]", "task.arity=3", "task.circuit_seed=4"]
    cfg = cfg_in(*overrides, "router=known", "router.topk=3", "trainer.epochs=60", "trainer.batch_size=32")
    result = run(cfg)[0]
    assert result["final"]["heldout_acc"] == pytest.approx(1.0, abs=1e-5)
    assert result["final"]["heldout_exact"] == pytest.approx(1.0, abs=1e-5)
    c = RandomCircuitTask(n_inputs=9, widths=[3, 3, 2], arity=3, circuit_seed=4).circuits[0]
    assert c.arity == 3 and len(c.library) >= 3  # three-input AND, OR, XOR (parity), NOR
    assert [[sorted(m) for m in layer[0]] for layer in result["routing"]["inputs"]] == c.routing


@pytest.mark.parametrize("model", ["modular", "shared"])
@pytest.mark.parametrize("k", [1, 3])
def test_module_width_follows_k_and_outputs_do_not(model, k):
    task = RandomCircuitTask(n_inputs=9, widths=[3, 3], n_outputs=3, arity=3)
    net = ModularNet(task, Learned(topk=k), gens(0), shared=model == "shared")
    bank = net.bank if model == "shared" else net.banks[0]
    assert bank.weights[0].shape[2] == k
    out = net(task.x[:5][None], task.task_id[:5][None])
    assert out.shape == (1, 5, 3)
    assert len(net.routing_summary()[0]["outputs"][0]) == 3


def test_skip_output_reads_every_layer(cfg_in):
    task = RandomCircuitTask(n_inputs=8, widths=[4, 4, 2])
    net = ModularNet(task, Learned(known_outputs=True), gens(0), skip_output=True)
    assert net.output_router.logits.shape[2] == 4 + 4 + 2
    assert net.routing_summary()[0]["outputs"] == [[8, 9]]  # the last layer, after the 8 earlier modules
    result = run(cfg_in("experiment=modular_known", "task=bool_6_3_3_2_2", "model.skip_output=true"))[0]
    assert result["final"]["heldout_acc"] == pytest.approx(1.0, abs=1e-5)


def test_results_record_flops_and_per_task_metrics(cfg_in, tmp_path):
    run(cfg_in("experiment=multitask_mlp", "model.hidden=[10]", "trainer.epochs=3", "trainer.replicates=2"))
    result = json.loads((tmp_path / "run" / "seed_0" / "results.json").read_text())
    forward = 2 * ((6 + 3) * 10 + 10 * 2)  # two linear layers: one multiply-add = 2 FLOPs
    assert result["flops"]["forward_per_sample"] == forward
    assert forward * 2 < result["flops"]["train_per_sample"] <= forward * 3  # backward: weight (+ input) grads
    assert result["flops"]["train"] == result["flops"]["train_per_sample"] * 3 * 153
    assert result["params"]["total"] == 9 * 10 + 10 + 10 * 2 + 2
    for t in range(3):
        assert 0 <= result["final"][f"task{t}_heldout_acc"] <= 1 and f"task{t}_train_loss" in result["final"]
    modular = run(cfg_in("experiment=multitask", "trainer.epochs=1", "seed=5"))[0]["flops"]
    assert modular["forward_per_sample"] > 0 and modular["train"] == modular["train_per_sample"] * 153


def test_two_task_preset_runs_with_per_task_metrics(cfg_in):
    result = run(cfg_in("experiment=multitask_known", "task=bool_multitask_0_2", "trainer.epochs=2"))[0]
    assert result["config"]["task"]["tasks"] == [0, 2]
    assert {k for k in result["final"] if k.startswith("task")} == {
        f"task{t}_{split}_{m}" for t in (0, 1) for split in ("train", "heldout") for m in ("loss", "acc", "exact")
    }
    assert len(result["routing"]["inputs"][0]) == 2  # a router row per task


def test_module_input_size_preset_sweeps_k(tmp_path):
    from conftest import cli

    proc = cli(
        "-m",
        "experiment=module_input_size",
        "trainer.epochs=1",
        "debug=quiet",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/results.json"))]
    assert sorted(r["config"]["router"]["topk"] for r in results) == [1, 2, 3]
    for r in results:
        k = r["config"]["router"]["topk"]
        assert all(len(module) == k for layer in r["routing"]["inputs"] for module in layer[0])
