"""Extending without forking: a task class and a model class from a user's own module, selected by
`_target_` in the user's own config folder (docs/extending.md)."""

import json
import sys
from pathlib import Path

import pytest

from modnets.train import main

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def user_configs(tmp_path: Path) -> Path:
    """The config folder of docs/extending.md: task/threshold.yaml and model/linear.yaml."""
    conf = tmp_path / "my_configs"
    (conf / "task").mkdir(parents=True)
    (conf / "model").mkdir()
    (conf / "task" / "threshold.yaml").write_text("_target_: my_research.ThresholdTask\nn_inputs: 6\ntrain_fraction: 0.8\n")
    (conf / "model" / "linear.yaml").write_text("_target_: my_research.LinearModel\nscale: 0.1\n")
    return conf


def train(monkeypatch, tmp_path, *overrides):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the user's module on the path, as `pip install -e .` of their own repo would
    argv = ["modnets-train", f"hydra.searchpath=[file://{user_configs(tmp_path)}]", "debug=quiet",
            f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "run").glob("**/results.json"))]


def test_user_task_and_model_train_to_full_heldout_accuracy(monkeypatch, tmp_path):
    results = train(monkeypatch, tmp_path, "task=threshold", "model=linear", "optimizer.lr=0.1", "trainer.epochs=60",
                    "trainer.batch_size=8", "trainer.replicates=2")
    assert [r["config"]["seed"] for r in results] == [0, 1]  # two replicates, one results file each
    for result in results:
        assert result["config"]["task"]["_target_"] == "my_research.ThresholdTask"
        assert result["params"]["total"] == 6 * 2 + 2  # one replicate's weights and biases
        assert result["final"]["heldout_acc"] == 1.0  # both outputs are linearly separable
        assert result["recovery"] is None  # no known circuit


def test_user_task_trains_a_built_in_model(monkeypatch, tmp_path):
    [result] = train(monkeypatch, tmp_path, "task=threshold", "model=mlp", "model.hidden=[16]", "trainer.epochs=3")
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]


@pytest.mark.parametrize("group, target", [("task", "builtins.dict"), ("model", "builtins.dict")])
def test_a_target_breaking_the_contract_is_one_line(capsys, monkeypatch, tmp_path, group, target):
    with pytest.raises(SystemExit) as e:
        train(monkeypatch, tmp_path, f"{group}._target_={target}")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"{group}._target_='{target}'" in err[0] and "docs/extending.md" in err[0]
