import csv
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
from conftest import cli, make_cfg

from modnets.results import config_hash, finished_results, replicate_config, seal
from modnets.train import run

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("aggregate", ROOT / "scripts" / "aggregate.py")
aggregate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aggregate)

TINY = ["experiment=modular", "debug=fast"]  # conf/debug/fast.yaml: quiet, 2 epochs


def results_in(folder: Path) -> dict[int, dict]:
    """seed -> results.json of every run under folder."""
    found = {}
    for p in folder.rglob("results.json"):
        r = json.loads(p.read_text())
        found[r["config"]["seed"]] = r
    return found


def test_two_job_sweep_with_joblib_completes_and_a_relaunch_runs_nothing_new(tmp_path):
    args = ["-m", "seed=1,2", *TINY, f"hydra.sweep.dir={tmp_path}"]
    proc = cli(*args, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = results_in(tmp_path)
    assert set(found) == {1, 2}
    for r in found.values():
        assert r["status"] == "completed" and len(r["history"]) == 2 and len(r["config_hash"]) == 16
    before = {p: p.read_bytes() for p in tmp_path.rglob("results.json")}
    again = cli(*args, "logger.mode=offline")  # another launcher and logger: the same runs
    assert again.returncode == 0, again.stderr
    assert "modnets: 2 of 2 jobs already finished" in again.stdout and "Launching" not in again.stdout + again.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("results.json")} == before
    assert not list(tmp_path.rglob("wandb"))


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_relaunch_launches_only_the_unfinished_jobs_into_their_own_folders(tmp_path, launcher):
    args = ["-m", "seed=1,2,3", *TINY, f"hydra.sweep.dir={tmp_path}", f"hydra/launcher={launcher}"]
    assert cli(*args).returncode == 0
    (tmp_path / "1" / "results.json").unlink()  # job 1 lost its results (killed, failed, deleted)
    failed = json.loads((tmp_path / "2" / "results.json").read_text()) | {"status": "failed"}
    (tmp_path / "2" / "results.json").write_text(json.dumps(failed))  # job 2 failed: run again
    kept = (tmp_path / "0" / "results.json").read_bytes()
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert "modnets: 1 of 3 jobs already finished" in again.stdout
    assert re.findall(r"\t#\d+ : seed=(\d)", again.stdout + again.stderr) == ["2", "3"]  # the launcher's job list
    found = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/results.json")}
    assert {k: r["config"]["seed"] for k, r in found.items()} == {"0": 1, "1": 2, "2": 3}  # each job in its folder
    assert all(r["status"] == "completed" for r in found.values())
    assert (tmp_path / "0" / "results.json").read_bytes() == kept


def test_two_job_sweep_with_submitit_local_completes(tmp_path):
    proc = cli(
        "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "seed=1,2", *TINY, f"hydra.sweep.dir={tmp_path}"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = results_in(tmp_path)
    assert set(found) == {1, 2} and all(r["status"] == "completed" for r in found.values())


def test_a_failing_job_is_recorded_the_others_finish_and_the_aggregator_reports_it(tmp_path, capsys):
    proc = cli("-m", "task.train_fraction=0.5,0.99", "trainer.replicates=2", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    good = [json.loads((tmp_path / "0" / f"seed_{s}" / "results.json").read_text()) for s in (1, 2)]
    bad = json.loads((tmp_path / "1" / "results.json").read_text())
    assert [r["status"] for r in good] == ["completed"] * 2 and good[0]["config"]["task"]["train_fraction"] == 0.5
    assert bad["status"] == "failed" and "task.train_fraction=0.99" in bad["error"]
    assert "job 1 failed" in proc.stderr and "task.train_fraction" in proc.stderr
    assert aggregate.main([str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "2 completed, 1 not" in out and "failed:" in out and "task.train_fraction=0.99" in out
    with open(tmp_path / "aggregate" / "failures.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["failed"] and rows[0]["path"].endswith("1/results.json")


def test_only_finished_results_of_the_same_config_are_reused(cfg_in, tmp_path):
    cfg = cfg_in("trainer.epochs=2", "trainer.replicates=2")
    assert finished_results(cfg) is None
    results = run(cfg)
    assert finished_results(cfg) == results
    assert finished_results(cfg_in("trainer.epochs=3", "trainer.replicates=2")) is None  # a changed hyper-parameter
    assert finished_results(cfg_in("trainer.epochs=2", "trainer.replicates=3")) is None  # seed 2 is missing
    path = tmp_path / "run" / "seed_1" / "results.json"
    path.write_text(json.dumps(results[1] | {"status": "failed"}))  # failed runs are retried
    assert finished_results(cfg) is None


def test_config_hash_ignores_paths_and_logging_but_not_hyperparameters(cfg_in):
    cfg = cfg_in("trainer.epochs=2")
    h = config_hash(replicate_config(cfg, 0))
    assert h == config_hash(replicate_config(cfg_in("trainer.epochs=2", "logger.mode=offline", "trainer.progress=true"), 0))
    assert h != config_hash(replicate_config(cfg, 1))  # replicate 1 is seed + 1
    assert h != config_hash(replicate_config(cfg_in("trainer.epochs=3"), 0))
    assert run(cfg)[0]["config_hash"] == h


def write_run(folder: Path, seed: int, heldout: float, fraction: float = 0.5, status: str = "completed"):
    """A results file as modnets writes it (sealed with its checksum)."""
    config = {
        "seed": seed,
        "output_dir": str(folder),
        "task": {"modularity": [6, 3, 2, 2], "train_fraction": fraction},
        "model": {"_target_": "modnets.models.ModularNet", "shared": False},
        "router": {"known_inputs": False, "known_outputs": False},
        "trainer": {"epochs": 2, "progress": False},
    }
    history = [{"epoch": 1, "heldout_acc": heldout / 2}, {"epoch": 2, "heldout_acc": heldout}]
    result = {
        "status": status,
        "config": config,
        "history": history,
        "final": history[-1],
        "best": history[-1],
        "recovery": {"input_routing": heldout, "random": {"input_routing": 0.3}},
    }
    if status != "completed":
        result = {"status": status, "error": "ConfigError: boom", "config": config}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(seal(result | {"config_hash": config_hash(config)})))


def test_aggregate_mean_std_and_confidence_interval_match_hand_computed_values(tmp_path):
    sweep, other = tmp_path / "sweep", tmp_path / "separate"
    for seed, acc in [(0, 0.5), (1, 0.75)]:
        write_run(sweep / "0" / f"seed_{seed}", seed, acc)
    write_run(other, 2, 1.0)  # a separately launched run of the same configuration
    write_run(sweep / "1", 0, 0.9, fraction=0.8)
    write_run(sweep / "2", 1, 0.0, fraction=0.8, status="failed")
    out = tmp_path / "agg"
    assert aggregate.main([str(sweep), str(other), "--out", str(out), "--no-plots"]) == 0
    with open(out / "summary.csv") as f:
        rows = {r["task.train_fraction"]: r for r in csv.DictReader(f)}
    a = rows["0.5"]
    # values 0.5, 0.75, 1.0: mean 0.75, sample std 0.25, t(0.975, 2) = 4.302653, CI = 4.302653 * 0.25 / sqrt(3)
    assert a["n"] == "3" and a["arch"] == "modular learned" and a["seeds"] == "0 1 2"
    assert float(a["final.heldout_acc_mean"]) == pytest.approx(0.75)
    assert float(a["final.heldout_acc_std"]) == pytest.approx(0.25)
    assert float(a["final.heldout_acc_ci95"]) == pytest.approx(4.302653 * 0.25 / math.sqrt(3), rel=1e-5)
    assert float(a["recovery.input_routing_mean"]) == pytest.approx(0.75)
    assert rows["0.8"]["n"] == "1" and rows["0.8"]["final.heldout_acc_ci95"] == "nan"
    assert len(list(csv.DictReader(open(out / "failures.csv")))) == 1
    assert len(list(csv.DictReader(open(out / "runs.csv")))) == 4


def test_aggregate_draws_the_figures(tmp_path):
    for i, (fraction, acc) in enumerate([(0.3, 0.6), (0.3, 0.7), (0.6, 0.9), (0.6, 0.8)]):
        write_run(tmp_path / "sweep" / str(i), i, acc, fraction=fraction)
    assert aggregate.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "agg")]) == 0
    for name in ("heldout_vs_fraction.png", "learning_curves.png", "recovery.png"):
        assert (tmp_path / "agg" / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_aggregate_reads_thousands_of_runs_in_seconds(tmp_path):
    import time

    for i in range(3000):
        write_run(
            tmp_path / "sweep" / str(i // 16) / f"seed_{i % 16}", i % 16, 0.5 + (i % 7) / 20, fraction=0.1 * (1 + i // 16 % 9)
        )
    start = time.time()
    assert aggregate.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "agg"), "--no-plots"]) == 0
    assert time.time() - start < 10


def test_slurm_launcher_settings_are_overrides():
    from hydra import compose, initialize_config_dir

    settings = ["partition=gpu", "timeout_min=120", "cpus_per_task=4", "gpus_per_node=1", "mem_gb=8"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            ["hydra/launcher=submitit_slurm", *(f"hydra.launcher.{s}" for s in settings)],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.cpus_per_task, launcher.gpus_per_node) == ("gpu", 120, 4, 1)


@pytest.mark.parametrize(
    "arch,model,known",
    [
        ("mlp", "MLP", None),
        ("modular", "ModularNet", False),
        ("modular_known", "ModularNet", True),
        ("shared_known", "ModularNet", True),
    ],
)
def test_sample_efficiency_architectures_compose_and_run(cfg_in, arch, model, known):
    cfg = cfg_in("experiment=sample_efficiency", f"arch={arch}", "task.modularity=[6,2,2]", "task.train_fraction=0.1")
    assert cfg.trainer.replicates == 16 and cfg.model._target_.endswith(model)
    result = run(cfg_in("experiment=sample_efficiency", f"arch={arch}", "trainer.epochs=1", "trainer.replicates=2"))[0]
    assert result["status"] == "completed"
    if known is not None:
        assert cfg.router.known_inputs == known and (result["recovery"]["input_routing"] == 1.0 or not known)


def test_config_hash_is_the_hash_of_the_config_without_the_ignored_keys(cfg_in):
    """The hash that resumable sweeps compare: sha256 of the sorted JSON minus UNHASHED keys, config untouched."""
    import copy
    import hashlib

    from modnets.results import UNHASHED

    config = replicate_config(cfg_in("experiment=shared", "trainer.epochs=2"), 0)
    before = copy.deepcopy(config)
    expected = copy.deepcopy(config)
    for key in UNHASHED:
        *parents, last = key.split(".")
        node = expected
        for p in parents:
            node = node[p]
        del node[last]
    digest = hashlib.sha256(json.dumps(expected, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert config_hash(config) == digest and config == before


def test_a_requeue_signal_ends_the_epoch_writes_a_checkpoint_and_the_requeued_run_matches(cfg_in, monkeypatch, capsys, tmp_path):
    """submitit's USR2 handler (time limit, preemption) runs only after the epoch's checkpoint is written."""
    import logging
    import signal
    from types import SimpleNamespace

    from submitit.core.job_environment import SignalHandler

    from modnets import checkpoint

    handler = SignalHandler.__new__(SignalHandler)  # submitit's handler in a job: it exits (and would requeue)
    handler.env, handler._delayed = SimpleNamespace(global_rank=0), SimpleNamespace(function=None)
    handler._logger = logging.getLogger("submitit-test")
    defer = checkpoint.defer_requeue

    def defer_then_signal():  # the signal arrives as soon as training started
        held = defer()
        signal.raise_signal(signal.SIGUSR2)
        return held

    cfg = cfg_in("experiment=modular", "trainer.epochs=6", "trainer.checkpoint_every=0")
    previous = signal.signal(signal.SIGUSR2, handler.checkpoint_and_exit)
    try:
        monkeypatch.setattr(checkpoint, "defer_requeue", defer_then_signal)
        with pytest.raises(SystemExit):
            run(cfg)
        state = checkpoint.unpack((Path(cfg.output_dir) / "checkpoint.pt").read_bytes())
        assert state["epoch"] == 1 and len(state["evals"]) == 1  # the whole first epoch, then the handler
        monkeypatch.setattr(checkpoint, "defer_requeue", defer)
        signal.signal(signal.SIGUSR2, handler.checkpoint_and_exit)  # the requeued job, under submitit again
        resumed = run(cfg)[0]
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert "resuming from" in capsys.readouterr().err and not (Path(cfg.output_dir) / "checkpoint.pt").exists()
    reference = run(make_cfg("experiment=modular", "trainer.epochs=6", output_dir=str(tmp_path / "reference")))[0]
    assert resumed["history"] == reference["history"] and len(reference["history"]) == 6


@pytest.mark.parametrize("n", [40, 70])  # 70: a forked copy of the process writes the second half
def test_many_results_files_written_at_once_are_each_whole_and_sealed_and_a_failure_is_its_own(tmp_path, n):
    from modnets.results import FORK_FROM, problem, write_jsons

    assert (n >= FORK_FROM) == (n == 70)
    (tmp_path / "blocked").write_text("a file where a folder must be")
    paths = [tmp_path / f"seed_{s}" / "results.json" for s in range(n)]
    blocked = {7, n - 3}
    for s in blocked:
        paths[s] = tmp_path / "blocked" / f"{s}" / "results.json"
    data = [{"seed": s, "history": [{"epoch": e, "acc": e / 10} for e in range(50)]} for s in range(n)]
    written = write_jsons(paths, data)
    assert all(isinstance(written[s], OSError) and written[s].filename for s in blocked) and not list(tmp_path.rglob("*.tmp"))
    for s, (path, result) in enumerate(zip(paths, written)):
        if s not in blocked:
            on_disk = json.loads(path.read_text())
            assert on_disk == result and problem(on_disk) is None and on_disk["seed"] == s and len(on_disk["history"]) == 50
