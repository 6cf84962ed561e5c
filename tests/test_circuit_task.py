"""task=circuit: circuits written in the config, their truth tables, known routing and one-line errors."""

import itertools
import json
import sys

import pytest

from modnets.config import ConfigError
from modnets.tasks import CircuitTask
from modnets.train import main, run

# y0 = MAJ(x0, x1, x2) XOR-ed with OR(x2, x3, x4) -- a hand-written 3-input circuit
MAJ_CIRCUIT = {"n_inputs": 5, "layers": [["MAJ(0,1,2)", "TH1(2,3,4)", "XOR(0,3,4)"], ["XOR(0,1,2)"]]}


def test_truth_table_of_a_hand_written_circuit():
    task = CircuitTask(**MAJ_CIRCUIT)
    assert task.x.shape == (32, 5) and task.y.shape == (32, 1)
    for row, bits in enumerate(itertools.product([0, 1], repeat=5)):
        x0, x1, x2, x3, x4 = bits
        maj, any_on, odd = int(x0 + x1 + x2 >= 2), int(x2 or x3 or x4), (x0 + x3 + x4) % 2
        assert task.x[row].tolist() == list(bits)
        assert task.y[row, 0] == (maj + any_on + odd) % 2, bits
    assert task.circuits[0].routing == [[[0, 1, 2], [2, 3, 4], [0, 3, 4]], [[0, 1, 2]]]
    assert task.circuits[0].library == ["MAJ", "TH1", "XOR"] and task.modularity == [5, 3, 1, 1]
    assert [len(task.splits[k]) for k in ("train", "val", "test")] == [25, 3, 4]


def test_outputs_pick_and_order_last_layer_modules():
    task = CircuitTask(n_inputs=3, layers=[["AND(0,1)", "OR(1,2)"]], outputs=[1, 0])
    expected = [[int(b or c), int(a and b)] for a, b, c in itertools.product([0, 1], repeat=3)]
    assert task.y.tolist() == expected  # (OR, AND) in the order outputs gives


@pytest.mark.parametrize("model", ["modular", "shared"])
def test_known_routing_solves_a_written_circuit(cfg_in, model):
    layers = '[["OR(0,1)","XOR(2,3)","XOR(4,5)"],["AND(0,1)","XOR(1,2)"]]'
    cfg = cfg_in("task=circuit", f"task.layers={layers}", f"model={model}", "router=known", "trainer.batch_size=8",
                 "trainer.epochs=200", "trainer.eval_every=50", "model.hidden=[12]")
    result = run(cfg)[0]
    assert result["final"]["heldout_exact"] == 1.0 and result["final"]["train_exact"] == 1.0
    assert result["recovery"]["input_routing"] == 1.0  # recovery metrics read the written circuit
    assert result["routing"]["inputs"][1][0] == [[0, 1], [1, 2]]


def test_a_list_of_circuits_is_a_multi_task_set(cfg_in):
    second = '{n_inputs:6,layers:[["OR(0,2)","OR(3,4)","OR(1,5)"],["AND(0,1)","AND(1,2)"]]}'
    first = '{n_inputs:6,layers:[["XOR(0,1)","XOR(2,3)","XOR(4,5)"],["AND(0,1)","AND(1,2)"]]}'
    cfg = cfg_in("task=circuit", "task.n_inputs=null", "task.layers=null", f"task.circuits=[{first},{second}]",
                 "model=shared", "router=known", "trainer.epochs=2")
    result = run(cfg)[0]
    assert "task1_heldout_acc" in result["final"] and result["recovery"]["input_routing"] == 1.0


BAD = [  # layers, the key named, a word of what is allowed
    ([["XOR(0,1)", "XOR(2,3)"], ["NOPE(0,1)"]], "task.layers[1][0]='NOPE(0,1)'", "a gate of the library"),
    ([["XOR(0,1)", "XOR(2,6)"], ["AND(0,1)"]], "task.layers[0][1]='XOR(2,6)'", "input indices below 6"),
    ([["XOR(0,1)", "XOR(2,3)"], ["AND(0,2)"]], "task.layers[1][0]='AND(0,2)'", "below 2"),
    ([["XOR(0,1)", "XOR(2,3)", "XOR(4,5)"], ["AND(0,1)"]], "task.layers[0][2]='XOR(4,5)'", "a module that is used"),
    ([["XOR(0,1)", "XOR(2,3)"], ["AND(0,1)", "OR(0,1)"]], "task.layers[1][1]='OR(0,1)'", "make it an output"),
    ([["XOR(0,1", "XOR(2,3)"], ["AND(0,1)"]], "task.layers[0][0]='XOR(0,1'", "GATE(i,j,...)"),
    ([["XOR(0,0)", "XOR(2,3)"], ["AND(0,1)"]], "task.layers[0][0]='XOR(0,0)'", "distinct"),
    ([["XOR(0,1)", "MAJ(2,3,4)"], ["AND(0,1)"]], "task.layers=", "one arity"),
]


@pytest.mark.parametrize("layers, key, allowed", BAD)
def test_bad_circuits_are_one_line_errors_naming_the_key(layers, key, allowed):
    outputs = [0] if "OR(0,1)" in str(layers) else None
    with pytest.raises(ConfigError) as e:
        CircuitTask(n_inputs=6, layers=layers, outputs=outputs)
    assert str(e.value).startswith(key) and allowed in str(e.value) and "\n" not in str(e.value)


def test_bad_gate_from_the_command_line_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["modnets-train", "task=circuit", 'task.layers=[["XOR(0,1)","XOR(2,3)"],["AND(0,9)"]]',
                                      "debug=quiet", f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["modnets: config error: task.layers[1][0]='AND(0,9)': expected input indices "
                                         "below 2, the width of the layer it reads"]


def test_a_circuit_kept_in_the_users_own_config_folder(capsys, tmp_path, monkeypatch):
    """docs/multitask.md's example: a task YAML in your own folder, added with hydra.searchpath."""
    (tmp_path / "myconf" / "task").mkdir(parents=True)
    (tmp_path / "myconf" / "task" / "majority.yaml").write_text(
        "defaults:\n  - circuit\n  - _self_\nname: majority\nn_inputs: 6\nlayers:\n"
        '  - ["MAJ(0,1,2)", "MAJ(3,4,5)", "XOR(0,2,4)"]\n  - ["MAJ(0,1,2)"]\n'
    )
    monkeypatch.setattr(sys, "argv", [
        "modnets-train", f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "task=majority", "router=known",
        "router.topk=3", "debug=fast",
        f"hydra.run.dir={tmp_path / 'run'}",
    ])
    main()
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["config"]["task"]["name"] == "majority"
    assert result["routing"]["inputs"][0][0] == [[0, 1, 2], [3, 4, 5], [0, 2, 4]]
