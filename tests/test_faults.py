"""Reliability II (issue 14): state files that cannot lie, full disks that lose nothing, an
aggregator that checks its inputs, one line for every file fault, a locked run folder and
warnings for absurd sizes. One test (or more) per defect, in the issue's order."""

import csv
import errno
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ENV, QUIET, main_in_process, make_cfg
from test_digits import write_idx

import modnets.results
import modnets.train
from modnets.digits import MNIST_FILES
from modnets.results import problem
from modnets.train import run

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["trainer.epochs=6", "trainer.checkpoint_every=2", "task.noise=0.1"]  # checkpoints after epochs 2 and 4
SAME = ("history", "final", "best", "routing", "recovery")
seal = getattr(modnets.results, "seal", lambda result: result)  # what modnets writes

spec = importlib.util.spec_from_file_location("aggregate", ROOT / "scripts" / "aggregate.py")
aggregate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aggregate)


def train_cli(capsys, *overrides):
    """`modnets-train debug=quiet OVERRIDES` in this process: (exit code, stderr lines from modnets)."""
    flags = [o for o in overrides if o == "-m"]  # before the overrides
    code = main_in_process(*flags, *QUIET, *(o for o in overrides if o != "-m"))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.strip()]


class Crash(Exception):
    pass


def crash_after_eval(monkeypatch, epoch):
    """The process dies right after evaluating `epoch` (as a kill would), leaving its checkpoint."""
    real = modnets.train.Recorder.__call__

    def call(self, e, metrics):
        real(self, e, metrics)
        if e == epoch:
            raise Crash

    monkeypatch.setattr(modnets.train.Recorder, "__call__", call)


def fill(folder: Path) -> Path:
    """Fill the disk of `folder` up to the last byte."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs (root only; skipped where mounting is not allowed)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


# ------------------------------------------------------------------- 1. a corrupted checkpoint


def test_a_checkpoint_with_changed_bytes_inside_a_tensor_is_never_used(cfg_in, tmp_path, capsys, monkeypatch):
    clean = run(cfg_in(*ARGS, *QUIET))
    cfg = make_cfg(*ARGS, *QUIET, output_dir=str(tmp_path / "corrupt"))
    with monkeypatch.context() as m:
        crash_after_eval(m, 5)
        with pytest.raises(Crash):
            run(cfg)
    path = tmp_path / "corrupt" / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    state = torch.load(io.BytesIO(bytes(data[data.index(b"PK\x03\x04") :])), weights_only=True)  # the torch payload
    weight = max(state["model"].values(), key=torch.Tensor.numel)
    raw = weight.numpy().tobytes()
    at = data.find(raw) + len(raw) // 2
    assert at > len(raw) // 2
    data[at : at + 16] = np.full(4, 3.0, np.float32).tobytes()  # 16 bytes inside the largest weight tensor
    path.write_bytes(data)
    capsys.readouterr()

    results = run(cfg)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("modnets")]
    assert len(err) == 1 and "corrupted" in err[0] and str(path) in err[0] and "from the start" in err[0], err
    for key in SAME:  # a clean restart: the results of the uninterrupted run
        assert results[0][key] == clean[0][key], key
    assert not path.exists()


def test_a_file_that_is_not_a_modnets_checkpoint_is_one_warning_and_a_clean_start(cfg_in, tmp_path, capsys):
    clean = run(cfg_in(*ARGS, *QUIET))
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"\x80\x04garbage\n" * 100)
    results = run(make_cfg(*ARGS, *QUIET, output_dir=str(folder)))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("modnets")]
    assert len(err) == 1 and "not a modnets checkpoint" in err[0], err
    assert all(results[0][key] == clean[0][key] for key in SAME)


# ------------------------------------------------------------------- 2. a full disk at the end of a run


def test_a_full_disk_when_results_are_written_keeps_the_checkpoint_and_a_relaunch_resumes(
    cfg_in, tiny_disk, capsys, monkeypatch
):
    clean = run(cfg_in(*ARGS, *QUIET))
    real = modnets.train.write_results
    monkeypatch.setattr(modnets.train, "write_results", lambda *a, **k: (fill(tiny_disk), real(*a, **k))[1])
    code, err = train_cli(capsys, *ARGS, f"hydra.run.dir={tiny_disk}")
    assert code == 1 and len(err) == 1, err
    assert "No space left on device" in err[0] and "results.json" in err[0] and "relaunch to resume" in err[0]
    assert (tiny_disk / "checkpoint.pt").exists() and not (tiny_disk / "results.json").exists()
    assert not list(tiny_disk.glob("*.tmp"))

    monkeypatch.setattr(modnets.train, "write_results", real)
    (tiny_disk / "filler").unlink()  # space is freed
    code, err = train_cli(capsys, *ARGS, f"hydra.run.dir={tiny_disk}")
    assert code == 0 and err == [f"modnets: resuming from {tiny_disk / 'checkpoint.pt'} after epoch 4"]
    result = json.loads((tiny_disk / "results.json").read_text())
    assert all(result[key] == clean[0][key] for key in SAME)
    assert not (tiny_disk / "checkpoint.pt").exists()


# ------------------------------------------------------------------- 3. a full disk in a sweep


def test_a_job_whose_failure_cannot_be_recorded_is_reported_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    real = os.replace

    def replace(src, dst, *a, **k):  # the disk of job 0's folder is full
        if Path(dst) == tmp_path / "0" / "results.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    code, err = train_cli(capsys, "-m", "seed=1,2", "trainer.epochs=2", f"hydra.sweep.dir={tmp_path}")
    assert code == 0
    job0 = [line for line in err if "job 0 failed" in line]
    assert len(job0) == 1 and "not recorded" in job0[0] and "No space left on device" in job0[0], err
    assert not (tmp_path / "0" / "results.json").exists()
    assert json.loads((tmp_path / "1" / "results.json").read_text())["status"] == "completed"  # job 1 ran


# ------------------------------------------------------------------- 4. a phantom failure


def test_a_retried_replicated_job_replaces_its_failed_record(tmp_path, capsys, monkeypatch):
    sweep = ["-m", "seed=1", "trainer.replicates=2", "trainer.epochs=2", f"hydra.sweep.dir={tmp_path}"]

    def boom(cfg):
        raise RuntimeError("a transient fault")

    with monkeypatch.context() as m:
        m.setattr(modnets.train, "build", boom)
        assert train_cli(capsys, *sweep)[0] == 0
    assert json.loads((tmp_path / "0" / "results.json").read_text())["status"] == "failed"
    assert train_cli(capsys, *sweep)[0] == 0  # the relaunch succeeds
    assert not (tmp_path / "0" / "results.json").exists()
    assert [json.loads((tmp_path / "0" / f"seed_{s}" / "results.json").read_text())["status"] for s in (1, 2)] == [
        "completed"
    ] * 2
    assert aggregate.main([str(tmp_path), "--no-plots"]) == 0
    assert "2 completed, 0 not" in capsys.readouterr().out


# ------------------------------------------------------------------- 5. the aggregator checks its inputs


def result_of(seed: int, heldout: float, fraction: float = 0.5) -> dict:
    config = {
        "seed": seed,
        "task": {"modularity": [6, 3, 2, 2], "train_fraction": fraction},
        "model": {"_target_": "modnets.models.ModularNet", "shared": False},
        "router": {"known_inputs": False, "known_outputs": False},
        "trainer": {"epochs": 2},
    }
    history = [{"epoch": 1, "heldout_acc": heldout / 2}, {"epoch": 2, "heldout_acc": heldout}]
    result = {"status": "completed", "config": config, "history": history, "final": history[-1], "best": history[-1]}
    return result | {"config_hash": modnets.results.config_hash(config)}


def write(path: Path, content) -> None:
    path.mkdir(parents=True, exist_ok=True)
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    (path / "results.json").write_bytes(data)


def aggregated(tmp_path, *folders) -> tuple[dict, list[dict]]:
    out = tmp_path / "agg"
    assert aggregate.main([*map(str, folders), "--out", str(out), "--no-plots"]) == 0
    with open(out / "summary.csv") as f:
        summary = {r["task.train_fraction"] if "task.train_fraction" in r else "": r for r in csv.DictReader(f)}
    with open(out / "failures.csv") as f:
        return summary, list(csv.DictReader(f))


def test_aggregator_counts_the_same_run_found_in_two_folders_once(tmp_path):
    write(tmp_path / "a" / "0", seal(result_of(0, 0.5)))
    write(tmp_path / "a" / "1", seal(result_of(1, 0.7)))
    write(tmp_path / "b" / "copy", seal(result_of(0, 0.5)))  # the same seed and config, copied
    summary, failures = aggregated(tmp_path, tmp_path / "a", tmp_path / "b")
    row = summary[""]
    assert row["n"] == "2" and row["seeds"] == "0 1" and float(row["final.heldout_acc_mean"]) == pytest.approx(0.6)
    assert [(f["status"], Path(f["path"]).parent.name) for f in failures] == [("duplicate", "copy")]


def test_aggregator_refuses_and_lists_non_finite_metrics(tmp_path):
    write(tmp_path / "s" / "0", seal(result_of(0, 0.5)))
    write(tmp_path / "s" / "1", seal(result_of(1, 0.7)))
    write(tmp_path / "s" / "2", seal(result_of(2, math.nan)))
    summary, failures = aggregated(tmp_path, tmp_path / "s")
    assert summary[""]["n"] == "2" and float(summary[""]["final.heldout_acc_mean"]) == pytest.approx(0.6)
    assert [f["status"] for f in failures] == ["non-finite"] and "final.heldout_acc" in failures[0]["error"]


def test_aggregator_lists_foreign_and_malformed_files_and_never_crashes(tmp_path, capsys):
    folder = tmp_path / "s"
    write(folder / "good", seal(result_of(0, 0.5)))
    bad = {
        "foreign": {"status": "completed"},
        "list": [1, 2],
        "null": None,
        "binary": b"\x00\xff\xfe garbage",
        "empty": b"",
        "edited": seal(result_of(1, 0.9)) | {"final": {"epoch": 2, "heldout_acc": 0.1}},  # changed after sealing
        "sealed_but_malformed": seal({"status": "completed", "config": {"seed": 3}, "final": [1, 2], "config_hash": "x"}),
    }
    for name, content in bad.items():
        write(folder / name, content)
    summary, failures = aggregated(tmp_path, folder)
    assert summary[""]["n"] == "1" and float(summary[""]["final.heldout_acc_mean"]) == pytest.approx(0.5)
    assert sorted(Path(f["path"]).parent.name for f in failures) == sorted(bad)
    out = capsys.readouterr().out
    assert "1 completed, 7 not" in out and all(f"/{name}/results.json" in out for name in bad)


# ------------------------------------------------------------------- 6. a diverged replicate's routing


def poison_after(monkeypatch, epoch_of_nan):
    """After evaluating `epoch_of_nan`, replicate 1's weights turn NaN."""
    real = modnets.train.Recorder.__call__

    def poison(self, epoch, metrics):
        real(self, epoch, metrics)
        if epoch == epoch_of_nan:
            with torch.no_grad():
                for p in self.model.parameters():
                    p[1] = float("nan")

    monkeypatch.setattr(modnets.train.Recorder, "__call__", poison)


@pytest.mark.parametrize("killed", [False, True], ids=["uninterrupted", "killed and resumed"])
def test_a_diverged_replicate_keeps_the_routing_and_recovery_of_its_last_finite_evaluation(tmp_path, monkeypatch, killed):
    overrides = ["experiment=modular", "trainer.replicates=2", "trainer.checkpoint_every=2", *QUIET]
    three = run(make_cfg(*overrides, "trainer.epochs=3", output_dir=str(tmp_path / "three")))
    cfg = make_cfg(*overrides, "trainer.epochs=6", output_dir=str(tmp_path / "six"))
    with monkeypatch.context() as m:
        poison_after(m, 3)
        if killed:  # dies after epoch 5; its checkpoint (epoch 4) holds the weights evaluated at epoch 3
            crash_after_eval(m, 5)
            with pytest.raises(Crash):
                run(cfg)
        else:
            results = run(cfg)
    if killed:  # relaunched: resumes from the checkpoint (its replayed evaluations poison nothing)
        results = run(cfg)
    assert [r["status"] for r in results] == ["completed", "diverged"] and results[1]["diverged_epoch"] == 4
    assert results[1]["history"] == three[1]["history"]
    assert results[1]["routing"] == three[1]["routing"]  # the weights evaluated last, not those after the NaN
    assert results[1]["recovery"] == three[1]["recovery"]


# ------------------------------------------------------------------- 7. one line for every file fault


def mnist_folder(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for key, name in MNIST_FILES.items():
        n = 40 if key.startswith("train") else 30
        data = rng.integers(0, 256, size=(n, 28, 28)) if key.endswith("images") else np.arange(n) % 10
        write_idx(folder / f"{name}.gz", data.astype(np.uint8), gz=True)
    return folder


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:-100])


def bad_header(path: Path):
    path.write_bytes(gzip.compress(b"\0\0\x08\xc8" + b"\0" * 8))  # 200 dimensions in a 12-byte file


def fewer_labels(path: Path):
    write_idx(path, np.arange(39).astype(np.uint8) % 10, gz=True)  # 40 images


MNIST_FAULTS = [
    ("train-images-idx3-ubyte.gz", truncate, "truncated gzip"),
    ("train-labels-idx1-ubyte.gz", bad_header, "header"),
    ("train-labels-idx1-ubyte.gz", fewer_labels, "40 images and train-labels-idx1-ubyte.gz 39 labels"),
]


@pytest.mark.parametrize("name,damage,problem", MNIST_FAULTS, ids=[f[1].__name__ for f in MNIST_FAULTS])
def test_a_malformed_mnist_file_is_one_line_naming_the_file_and_the_problem(tmp_path, capsys, name, damage, problem):
    folder = mnist_folder(tmp_path / "mnist")
    damage(folder / name)
    overrides = ["experiment=digits_mlp", "task=mnist", f"task.root={folder}", f"hydra.run.dir={tmp_path / 'run'}"]
    code, err = train_cli(capsys, *overrides)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("modnets: config error: task.root=") and problem in err[0]
    assert str(folder / name) in err[0] or "labels" in problem


@pytest.mark.parametrize("key", ["hydra.run.dir", "output_dir"])
def test_an_output_folder_that_cannot_be_created_is_one_line_naming_it(tmp_path, capsys, key):
    (tmp_path / "file").write_text("a file where a folder should be")
    where = [f"hydra.run.dir={tmp_path / 'run'}"] if key == "output_dir" else []
    code, err = train_cli(capsys, "trainer.epochs=1", *where, f"{key}={tmp_path / 'file' / 'run'}")
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("modnets: error: ") and str(tmp_path / "file") in err[0]


def test_an_edited_results_file_is_not_trusted_and_the_run_is_redone(cfg_in, tmp_path, capsys):
    cfg = cfg_in("trainer.epochs=2", *QUIET)
    first = run(cfg)[0]
    path = tmp_path / "run" / "results.json"
    edited = json.loads(path.read_text())
    edited["final"]["heldout_acc"] = 1.0
    path.write_text(json.dumps(edited))
    capsys.readouterr()
    again = run(cfg)[0]
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("modnets")]
    assert len(err) == 1 and str(path) in err[0] and "checksum" in err[0] and "runs again" in err[0], err
    assert again["final"] == first["final"] != edited["final"]
    assert json.loads(path.read_text())["final"] == first["final"]


@pytest.mark.parametrize("override", ["seed=18446744073709551616", "trainer.threads=100000000000000000000"])
def test_a_value_that_does_not_fit_its_type_is_one_line(tmp_path, capsys, override):
    code, err = train_cli(capsys, override, f"hydra.run.dir={tmp_path}")
    key = override.split("=")[0]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"modnets: config error: {key}=") and "64 bits" in err[0]


# ------------------------------------------------------------------- 8. absurd sizes, two processes


class Stop(Exception):
    pass


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["trainer.replicates=100000"], "trainer.replicates=100000"),
        (["trainer.replicates=1000", "trainer.epochs=1000000", "trainer.eval_every=1"], "trainer.eval_every=1"),
    ],
)
def test_absurd_work_is_one_warning_line_before_anything_is_built(cfg_in, capsys, monkeypatch, overrides, named):
    def build(cfg):
        raise Stop

    monkeypatch.setattr(modnets.train, "build", build)
    cfg = cfg_in(*overrides, "trainer.progress=false")
    cfg.logger.mode = "offline"
    with pytest.raises(Stop):
        run(cfg)
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("modnets: warning: ") for line in err), err  # one line per warning
    assert err[0].startswith(f"modnets: warning: {named}: about ") and "estimated" in err[0]
    assert not list(Path(cfg.output_dir).glob("seed_*"))  # nothing opened yet


def test_a_second_process_on_the_same_run_folder_stops_with_one_line(tmp_path, capsys):
    folder = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "modnets.train", *QUIET, "trainer.epochs=100000", f"hydra.run.dir={folder}"],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        lock = folder / ".modnets.lock"
        while not (lock.exists() and lock.read_text()) and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        code, err = train_cli(capsys, "trainer.epochs=2", f"hydra.run.dir={folder}")
        assert first.poll() is None, "the first process runs on"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert code == 1 and len(err) == 1, err
    assert err[0] == f"modnets: error: {folder} is in use by another modnets process (pid {first.pid}); " + (
        "wait for it to end or choose another output folder"
    )
    assert not (folder / "results.json").exists()


# ------------------------------------------------------------------- results formats 1 and 2


def format_1(result: dict) -> dict:
    """A results dict sealed as modnets wrote it before format 2: sha256 of the sorted-key encoding."""
    body = {k: v for k, v in result.items() if k != "checksum"} | {"format": "modnets-results-1"}
    return body | {"checksum": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()}


def test_a_results_file_is_encoded_once_and_its_checksum_is_that_of_the_written_bytes(tmp_path):
    path = tmp_path / "results.json"
    written = modnets.results.write_json(path, result_of(0, 0.5) | {"circuits": ({"op": "AND"}, {"op": "OR"})})
    text = path.read_text()
    body, tail = text.rsplit(',\n "checksum": ', 1)
    assert hashlib.sha256((body + "\n}\n").encode()).hexdigest() == json.loads(tail[:-3]) == written["checksum"]
    loaded = json.loads(text)
    assert loaded["format"] == "modnets-results-2" and list(loaded)[-1] == "checksum" and problem(loaded) is None
    assert problem(json.loads(json.dumps(loaded, indent=3))) is None  # the layout on disk does not matter, the content does


@pytest.mark.parametrize("seal_as", [format_1, seal], ids=["format-1", "format-2"])
def test_results_files_of_both_formats_are_read_and_an_edit_to_either_is_caught(tmp_path, seal_as):
    sealed = json.loads(json.dumps(seal_as(result_of(0, 0.5))))
    assert problem(sealed) is None
    edits = {
        "value": sealed | {"final": {"epoch": 2, "heldout_acc": 0.9}},
        "nested": sealed | {"history": [sealed["history"][0], {"epoch": 2, "heldout_acc": 0.25}]},
        "added key": sealed | {"note": "x"},
        "other format's rule": sealed | {"format": "modnets-results-2" if seal_as is format_1 else "modnets-results-1"},
    }
    for name, edited in edits.items():
        assert problem(edited) == "corrupted or edited: its content does not match its checksum", name
    assert "results format 'modnets-results-9'" in problem(sealed | {"format": "modnets-results-9"})


def test_a_format_1_results_file_counts_as_finished_and_its_job_is_skipped(cfg_in, tmp_path, capsys):
    cfg = cfg_in("trainer.epochs=2", *QUIET)
    first = run(cfg)[0]
    path = tmp_path / "run" / "results.json"
    path.write_text(json.dumps(format_1(json.loads(path.read_text()))))
    capsys.readouterr()
    again = run(cfg)[0]
    assert "skipped" in capsys.readouterr().out and again["format"] == "modnets-results-1"
    assert again["history"] == first["history"]
