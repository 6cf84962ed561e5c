import json
from pathlib import Path

import pytest
import torch
from conftest import cli

from modnets.train import Evaluator, build, fit, run

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", ["modular_known", "shared_known"])
def test_known_routing_reaches_full_heldout_accuracy(cfg_in, experiment):
    result = run(cfg_in(f"experiment={experiment}"))[0]
    assert result["config"]["trainer"]["epochs"] == 200 and result["config"]["seed"] == 1
    assert result["final"]["heldout_acc"] == 1.0
    assert result["final"]["heldout_exact"] == 1.0


@pytest.mark.parametrize("router", ["known", "known_outputs"])
def test_known_routers_do_not_change_during_training(cfg_in, router):
    cfg = cfg_in("model=shared", f"router={router}", "trainer.epochs=3", "trainer.batch_size=8")
    b = build(cfg)
    before = {n: p.detach().clone() for n, p in b.model.named_parameters()}
    fit(cfg, b.task, b.model, b.optimizer, b.scheduler, b.generators, Evaluator(b.task, 64), lambda e, m: None)
    after = dict(b.model.named_parameters())
    fixed = {"known": ("routers.", "output_router.", "locations."), "known_outputs": ("output_router.",)}[router]
    for name, p in after.items():
        changed = not torch.equal(before[name], p)
        assert changed != name.startswith(fixed), name


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes_and_runs(cfg_in, experiment):
    result = run(cfg_in(f"experiment={experiment}", "debug=fast"))[0]
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    for split in ("train", "val", "test", "heldout"):
        for metric in ("loss", "acc", "exact"):
            assert 0.0 <= result["final"][f"{split}_{metric}"] < 10


def test_results_file_contract(cfg_in, tmp_path):
    run(cfg_in("experiment=shared", "trainer.epochs=4", "trainer.eval_every=2"))
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [2, 4]
    assert result["final"] == result["history"][-1]
    assert result["best"]["val_acc"] == max(h["val_acc"] for h in result["history"])
    assert result["config"]["model"]["library_size"] == 2
    assert result["params"]["routers"] > 0 and result["params"]["trainable"] <= result["params"]["total"]
    assert set(result["routing"]) == {"inputs", "outputs", "locations"}
    for key in ("wall_time_s", "train_time_s", "modnets_version", "git_commit", "status"):
        assert key in result


def test_heldout_is_val_and_test_together(cfg_in):
    f = run(cfg_in("trainer.epochs=2"))[0]["final"]
    assert abs(f["heldout_acc"] - (6 * f["val_acc"] + 7 * f["test_acc"]) / 13) < 1e-6


def test_mlp_preset_learns_the_training_set(cfg_in):
    final = run(cfg_in("experiment=mlp", "trainer.epochs=300"))[0]["final"]
    assert final["train_acc"] == 1.0


def test_multirun_sweep_writes_results_and_offline_wandb_runs(tmp_path):
    proc = cli("-m", "seed=1,2", "experiment=modular", "trainer.epochs=2", f"hydra.sweep.dir={tmp_path}")  # W&B offline
    assert proc.returncode == 0, proc.stderr
    results = sorted(tmp_path.glob("*/results.json"))
    assert len(results) == 2
    seeds = {json.loads(p.read_text())["config"]["seed"] for p in results}
    assert seeds == {1, 2}
    runs = sorted(tmp_path.glob("*/wandb/offline-run-*"))
    assert len(runs) == 2
    ids = {json.loads(p.read_text())["wandb_id"] for p in results}
    assert len(ids) == 2
    assert {run.name.rsplit("-", 1)[-1] for run in runs} == ids


def test_offline_wandb_runs_hold_every_logged_epoch_and_the_summary(cfg_in, tmp_path):
    cfg = cfg_in("experiment=modular", "trainer.epochs=3", "trainer.replicates=2")
    cfg.logger.mode = "offline"
    results = run(cfg)  # W&B runs in its worker process; run() returns once every W&B run is finished
    for result in results:
        seed = result["config"]["seed"]
        (file,) = (tmp_path / "run" / f"seed_{seed}" / "wandb").glob(f"offline-run-*-{result['wandb_id']}/run-*.wandb")
        records = file.read_bytes()  # protobuf records: keys are stored as plain strings
        assert records.count(b"heldout_exact") >= 3, "one history row per epoch"
        assert b"final/heldout_acc" in records and b"recovery/input_routing" in records


def test_modularity_override_reshapes_the_model(cfg_in):
    result = run(cfg_in("task.modularity=[6,3,3,2,2]", "router=known", "trainer.epochs=1"))[0]
    assert len(result["routing"]["inputs"]) == 3


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model=nonexistent"], "model/nonexistent"),
        (["router.topk=4"], "router.topk"),
        (["task.train_fraction=0.99"], "task.train_fraction"),
        (["router=known", "model.num_modules=[3,3]"], "model.num_modules"),
        (["model=mlp", "task.modularity=[6,4,4,2]"], "task.modularity"),
        (["trainer.device=tpu"], "trainer.device"),
        (["trainer.epochs=-1"], "trainer.epochs"),
        (["model=mlp", "router=known"], "router"),
    ],
)
def test_bad_overrides_exit_nonzero_with_one_line_naming_the_key(tmp_path, overrides, key):
    proc = cli(*overrides, "debug=quiet", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert key in proc.stderr.splitlines()[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_quickstart_compares_dense_learned_and_known_with_one_line_each(tmp_path):
    proc = cli("experiment=quickstart", "debug=fast", "trainer.replicates=2", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    archs = ["arch=mlp", "arch=modular", "arch=modular_known"]
    lines = [line for line in proc.stdout.splitlines() if "held-out accuracy" in line]
    assert [line.split(":")[1].strip().split(",")[0] for line in lines] == archs  # label: the job's overrides
    assert all("2 seeds; majority answer" in line for line in lines)
    assert sorted(p.parent.parent.name.split(",")[0] for p in tmp_path.glob("*/seed_0/results.json")) == archs


def test_majority_baseline_is_the_constant_answer_of_the_training_rows(cfg_in):
    result = run(cfg_in("debug=fast", "task.train_fraction=0.5"))[0]
    b = build(cfg_in("debug=fast", "task.train_fraction=0.5"))
    y, splits = b.task.y, b.task.splits
    guess = [int(2 * y[splits["train"], j].sum() > len(splits["train"])) for j in range(y.shape[1])]
    for split in ("train", "heldout"):
        rows = y[splits[split]]
        expected = sum(int(v == guess[j]) for row in rows.tolist() for j, v in enumerate(row)) / rows.numel()
        assert result["majority"][f"{split}_acc"] == pytest.approx(expected)
    assert 0.5 <= result["majority"]["train_acc"] < 1.0
