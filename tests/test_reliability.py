"""Reliability: one-line config errors, resource guard, checkpoint and resume after SIGKILL,
divergence, W&B failures, deterministic results files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ENV, QUIET, cli, main_in_process, make_cfg

import modnets.logger
import modnets.train
from modnets.checkpoint import Checkpointer
from modnets.config import ConfigError, validate
from modnets.train import build, run

ROOT = Path(__file__).resolve().parent.parent


def modnets_train(capsys, tmp_path, *overrides):
    """`modnets-train OVERRIDES` in this process (the console script's own entry point):
    (exit code, stderr lines)."""
    code = main_in_process(*QUIET, *overrides, f"hydra.run.dir={tmp_path / 'cli'}")
    return code, capsys.readouterr().err.strip().splitlines()


BAD = [  # overrides, the key named, a word of what is allowed
    (["trainer.epochs=abc"], "trainer.epochs='abc'", "integer"),  # wrong type
    (["trainer.replicates=2.5"], "trainer.replicates=2.5", "integer"),
    (["router.gumbel=yes"], "router.gumbel='yes'", "true or false"),
    (["model=mlp", "model.hidden=[a,3]"], "model.hidden=['a', 3]", "list of integers"),
    (["optimizer.weight_decay=abc"], "optimizer.weight_decay='abc'", "weight decay"),
    (["trainer.foo=1"], "trainer.foo", "unknown key"),  # unknown keys: Hydra's struct mode ...
    (["model.foo=1"], "model.foo", "unknown key"),
    (["+model.foo=1"], "model.foo=1", "a key of modnets.models.ModularNet"),  # ... and keys added with +
    (["+trainer.foo=1"], "trainer.foo=1", "a key of trainer"),
    (["model=nonexistent"], "model/nonexistent", "one of"),
    (["trainer.epochs=["], "trainer.epochs=[", "not a valid override"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1", "positive learning rate"),  # ranges
    (["trainer.epochs=-1"], "trainer.epochs=-1", "integer >= 1"),
    (["trainer.epochs=0"], "trainer.epochs=0", "integer >= 1"),
    (["task.train_fraction=1.5"], "task.train_fraction=1.5", "(0, 1)"),
    (["task.train_fraction=0"], "task.train_fraction=0", "(0, 1)"),
    (["router.topk=7"], "router.topk=7", "at most 6"),  # topk larger than the layer it reads
    (["model.num_modules=[3,4]", "router.topk=4"], "router.topk=4", "at most 3"),
    (["router=known", "model.num_modules=[3,3]"], "model.num_modules=[3, 3]", "[3, 2]"),  # layer lists vs the task
    (["model.num_modules=[3,1]"], "model.num_modules=[3, 1]", "at least 2 modules"),
    (["model=mlp", "task.modularity=[6,4,4,2]"], "task.modularity=[6, 4, 4, 2]", "one of"),
    (["trainer.device=tpu"], "trainer.device='tpu'", "auto, cpu, cuda"),  # unknown device
    (["trainer.device=cuda:0"] if not torch.cuda.is_available() else ["trainer.device=cuda:99"], "trainer.device=", "cuda"),
    (["model=mlp", "task.modularity=[40,2]"], "task.modularity=[40, 2]", "GB estimated"),  # resource guard: data
    (["task=bool_random", "task.n_inputs=100", "task.samples=1000000000000"], "task.samples=1000000000000", "GB estimated"),
    (["model=mlp", "model.hidden=[50000,50000]", "trainer.replicates=64"], "trainer.replicates=64", "GB estimated"),  # model
]


@pytest.mark.parametrize("overrides,named,allowed", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_is_one_line_naming_key_value_and_what_is_allowed(capsys, tmp_path, overrides, named, allowed):
    code, err = modnets_train(capsys, tmp_path, *overrides)
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"modnets: config error: {named}"), err[0]
    assert allowed in err[0]
    assert not list((tmp_path / "cli").glob("**/results.json"))


def test_bad_config_from_the_command_line_exits_2_without_traceback(tmp_path):
    for args in (["trainer.foo=1"], ["trainer.epochs=abc"]):
        proc = cli(*args, *QUIET, f"hydra.run.dir={tmp_path}")
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and args[0].split("=")[0] in proc.stderr
        assert "Traceback" not in proc.stderr


def test_every_shipped_preset_validates():
    for preset in sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")):
        validate(make_cfg(f"experiment={preset}"))
    with pytest.raises(ConfigError, match="task.noise"):
        validate(make_cfg("task.noise=-0.1"))


def test_memory_estimate_is_refused_before_the_task_is_built(cfg_in, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the task must not be built")

    monkeypatch.setattr(modnets.tasks, "random_table", never)
    with pytest.raises(ConfigError, match=r"task.modularity=\[30, 2\].*GB estimated.*GB available"):
        build(cfg_in("model=mlp", "task.modularity=[30,2]"))


# ------------------------------------------------------------------------------------- resume

RESUMABLE = [
    "experiment=modular_gumbel",
    "task.noise=0.1",
    "trainer.replicates=2",
    "trainer.epochs=200",
    "trainer.eval_every=2",
    "trainer.deterministic=true",
    *QUIET,
]


def results_of(folder: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("seed_*/results.json"))}


def test_killed_run_resumes_from_its_checkpoint_with_identical_results(cfg_in, tmp_path):
    """SIGKILL after a checkpoint, start again with the same config and folder: the same metrics,
    history and routing as a run never interrupted (CPU, replicates, Gumbel and input noise)."""
    run(cfg_in(*RESUMABLE))  # uninterrupted, into tmp_path / run
    folder = tmp_path / "killed"
    args = [*RESUMABLE, "trainer.checkpoint_every=5", f"hydra.run.dir={folder}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "modnets.train", *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (folder / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (folder / "checkpoint.pt").exists() and not results_of(folder), "killed after its first checkpoint"

    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    epoch = int(resumed.stderr.split("after epoch ")[1].split()[0])
    assert 5 <= epoch < 200
    assert not (folder / "checkpoint.pt").exists()  # removed when training ended
    expected, got = results_of(tmp_path / "run"), results_of(folder)
    assert list(got) == list(expected) == ["seed_1", "seed_2"]  # the preset sets seed=1
    for seed in expected:
        for key in ("final", "best", "history", "routing", "recovery", "params"):
            assert got[seed][key] == expected[seed][key], (seed, key)


def test_checkpoint_of_another_config_is_ignored(cfg_in, tmp_path, capsys):
    cfg = cfg_in("trainer.epochs=4", "trainer.checkpoint_every=2", *QUIET)
    b = build(cfg)
    Checkpointer(cfg, b.model, b.optimizer, b.scheduler, b.generators).save(2)  # left by a run with lr 0.01
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    result = run(cfg_in("trainer.epochs=4", "trainer.checkpoint_every=2", "optimizer.lr=0.02", *QUIET))[0]
    assert "belongs to another config" in capsys.readouterr().err
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3, 4]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_failing_checkpoint_write_warns_once_and_training_goes_on(cfg_in, tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modnets.checkpoint.torch, "save", full)
    result = run(cfg_in("trainer.epochs=4", "trainer.checkpoint_every=1", *QUIET))[0]
    err = capsys.readouterr().err
    assert err.count("No space left on device") == 1 and "training goes on" in err
    assert result["status"] == "completed" and len(result["history"]) == 4
    assert not list((tmp_path / "run").glob("checkpoint.pt*"))


# ------------------------------------------------------------------------------------- divergence


def test_absurd_learning_rate_writes_a_diverged_results_file(capsys, tmp_path):
    code, err = modnets_train(capsys, tmp_path, "optimizer.lr=1e30", "trainer.epochs=50")
    assert code == 0  # a result, not a crash: a sweep goes on
    assert len(err) == 1 and err[0].startswith("modnets: diverged: NaN or inf loss in epoch")
    text = (tmp_path / "cli" / "results.json").read_text()
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))  # strict JSON
    assert result["status"] == "diverged"
    assert result["diverged_epoch"] < 50
    assert all(h["epoch"] < result["diverged_epoch"] for h in result["history"])
    assert result["final"] == (result["history"][-1] if result["history"] else None)


def test_one_diverging_replicate_leaves_the_others_untouched(cfg_in, tmp_path, monkeypatch):
    clean = run(cfg_in("experiment=modular", "trainer.replicates=3", "trainer.epochs=6", *QUIET))

    def poisoned_build(cfg):  # replicate 1 starts with a NaN weight
        b = build(cfg)
        with torch.no_grad():
            b.model.banks[0].weights[0][1, 0, 0, 0] = float("nan")
        return b

    monkeypatch.setattr(modnets.train, "build", poisoned_build)
    out = tmp_path / "poisoned"
    results = run(make_cfg("experiment=modular", "trainer.replicates=3", "trainer.epochs=6", *QUIET, output_dir=str(out)))
    assert [r["status"] for r in results] == ["completed", "diverged", "completed"]
    assert results[1]["history"] == [] and results[1]["final"] is None and results[1]["diverged_epoch"] == 1
    for r in (0, 2):
        assert results[r]["history"] == clean[r]["history"]
    on_disk = json.loads((out / "seed_2" / "results.json").read_text())
    assert on_disk["status"] == "diverged"  # seed 1 + replicate 1


# ------------------------------------------------------------------------------------- W&B


def test_bad_wandb_mode_warns_once_and_results_are_written(capsys, tmp_path):
    code, err = modnets_train(capsys, tmp_path, "logger.mode=bogus", "trainer.epochs=2", "trainer.replicates=2")
    assert code == 0
    assert len(err) == 1 and "logger.mode='bogus'" in err[0] and "results.json continue" in err[0]
    assert len(results_of(tmp_path / "cli")) == 2


def test_online_wandb_without_network_gives_up_quickly_once(cfg_in, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: no network
    start = time.time()
    cfg = cfg_in("trainer.epochs=2", "trainer.replicates=3", )
    cfg.logger.mode, cfg.logger.init_timeout = "online", 2
    results = run(cfg)
    elapsed = time.time() - start
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("modnets")]
    assert len(err) == 1 and "W&B failed" in err[0]
    assert elapsed < 20, "one init timeout for all replicates, not one each"
    assert [r["status"] for r in results] == ["completed"] * 3 and all(r["wandb_id"] is None for r in results)


def test_unwritable_wandb_folder_warns_once_and_results_are_written(cfg_in, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "wandb").write_text("a file where W&B wants its folder")
    cfg = cfg_in("trainer.epochs=2", )
    cfg.logger.mode = "offline"
    result = run(cfg)[0]
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("modnets")]
    assert len(err) == 1 and "W&B failed" in err[0]
    assert result["status"] == "completed" and json.loads((tmp_path / "run" / "results.json").read_text())["final"]


def test_nearly_full_disk_turns_wandb_off_with_one_warning(cfg_in, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(modnets.logger.shutil, "disk_usage", lambda p: type("U", (), {"free": 4096})())
    cfg = cfg_in("trainer.epochs=2", "trainer.replicates=2", )
    cfg.logger.mode = "offline"
    results = run(cfg)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("modnets")]
    assert len(err) == 1 and "4096 bytes free" in err[0]
    assert [r["status"] for r in results] == ["completed", "completed"]
    assert not (tmp_path / "run" / "seed_0" / "wandb").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_wandb_folder_filling_up_during_the_run_warns_and_results_are_written(cfg_in, tmp_path, capsys, monkeypatch):
    wandb_dir = tmp_path / "run" / "wandb"
    wandb_dir.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(wandb_dir)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setattr(modnets.logger, "MIN_FREE_BYTES", 0)  # let W&B start on the tiny disk
        cfg = cfg_in("trainer.epochs=30", )
        cfg.logger.mode = "offline"
        result = run(cfg)[0]
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("modnets")]
        assert len(err) == 1 and ("full" in err[0] or "W&B failed" in err[0]), err
        assert result["status"] == "completed" and (tmp_path / "run" / "results.json").exists()
    finally:
        subprocess.run(["umount", "-l", str(wandb_dir)], capture_output=True)  # lazy: W&B may still hold files


# ------------------------------------------------------------------------------------- determinism

TIMINGS = ("train_time_s", "wall_time_s", "timings_s", "checksum")  # the checksum covers the timings


def test_same_config_and_seed_give_identical_results_files(cfg_in, tmp_path):
    """Two processes (this one and a CLI run), same config and seed: identical files but timings
    (and the checksum over them)."""
    overrides = ["experiment=shared", "router=gumbel", "task.noise=0.1", "trainer.replicates=2", "trainer.epochs=20", *QUIET]
    run(cfg_in(*overrides))
    proc = cli(*overrides, f"hydra.run.dir={tmp_path / 'again'}")
    assert proc.returncode == 0, proc.stderr
    first, second = results_of(tmp_path / "run"), results_of(tmp_path / "again")
    assert len(first) == 2
    for seed in first:
        a, b = first[seed], second[seed]
        for r in (a, b):
            for key in TIMINGS:
                r.pop(key)
            r["config"].pop("output_dir")
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
