"""Weights & Biases logging: one W&B run per replicate, offline by default.

W&B runs in a worker process (`python -m modnets.logger`) that the first `start()` launches:
importing wandb and starting runs costs about a second of CPU, which the worker spends on the
other core while this process imports torch and trains. `log` and `finish` only queue a line
for it; `close()` waits until it has finished every run. Run ids are chosen here, so the
results file names its W&B run without asking the worker.

A failing W&B (bad mode, no network, full disk) warns once, on one stderr line, and training
goes on: the results file, not W&B, is the record of a run. `wandb.init` gives up after
`init_timeout` seconds (no network for `online`), and after one failed start the worker opens
no more runs, so R replicates cost one timeout, not R; `finish` waits at most `finish_timeout`
seconds for uploads. A W&B directory on a (nearly) full disk is reported the same way.
`log_image` sends the image file's bytes and `log_table` the rows: the worker makes W&B's objects.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

MODES = ("offline", "online", "disabled")
MIN_FREE_BYTES = 16 * 1024**2  # W&B is not started in a folder with less free space than this
ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"  # W&B's own run-id alphabet
PYTHONPATH = os.pathsep.join([str(Path(__file__).resolve().parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])])


def free_bytes(directory: str) -> int | None:
    """Free bytes where W&B writes: `directory/wandb` (or the nearest folder that exists)."""
    path = (Path(directory) / "wandb").resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


class _NullRun:
    id, live = None, False

    def log(self, metrics, step):
        pass

    def log_image(self, key, path, step):
        pass

    def log_table(self, key, columns, rows, step):
        pass

    def finish(self, summary=None):
        pass


class _Run:
    """One W&B run in the worker: every call queues a message and returns at once."""

    live = True

    def __init__(self, logger, index: int, run_id: str, directory: str):
        self.logger, self.index, self.id, self.directory = logger, index, run_id, directory

    def log(self, metrics, step):
        self.logger._send({"op": "log", "run": self.index, "data": metrics, "step": step})

    def log_image(self, key: str, path, step: int) -> None:
        """An image file (its bytes are read now: the file may change afterwards)."""
        try:
            data = base64.b64encode(Path(path).read_bytes()).decode()
        except OSError as e:
            return self.logger._warn(f"W&B failed (cannot read image {path}: {e})")
        self.logger._send({"op": "log", "run": self.index, "data": {key: {"__image__": data}}, "step": step})

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        table = {"__table__": {"columns": list(columns), "rows": rows}}
        self.logger._send({"op": "log", "run": self.index, "data": {key: table}, "step": step})

    def finish(self, summary=None):
        self.logger._send({"op": "finish", "run": self.index, "summary": summary or {}})


def _encode(value):
    """JSON for the worker: tensors and numpy numbers as floats, anything else as text."""
    return float(value) if hasattr(value, "item") else str(value)


class WandbLogger:
    """The `logger` group. `start()` opens one run; call `finish()` on every run it returns."""

    def __init__(
        self,
        mode="offline",
        project="modnets",
        entity=None,
        group=None,
        tags=(),
        job_type="train",
        init_timeout=30.0,
        finish_timeout=60.0,
        max_points=250,
        pictures=True,
        max_pictures=16,
    ):
        self.max_points = int(max_points)  # W&B charts sample long histories anyway; results.json keeps them all
        self.pictures = bool(pictures)  # circuit.png and W&B images of modular runs (false: nothing is drawn)
        self.max_pictures = int(max_pictures)  # only the first this many replicates of a run get pictures
        self.mode, self.project, self.entity = mode, project, entity
        self.group, self.tags, self.job_type = group, list(tags or []), job_type
        self.init_timeout, self.finish_timeout = init_timeout, finish_timeout
        self._warned = False
        self._timeouts = {"init_timeout": float(init_timeout), "finish_timeout": float(finish_timeout)}
        self._worker, self._runs = None, []
        if mode not in MODES:
            self._warn(f"logger.mode={mode!r} is not one of {MODES}; W&B logging is off for this run")
            self.mode = "disabled"

    def _warn(self, message):
        if not self._warned:
            message = " ".join(str(message).split())  # one line, whatever W&B's message looks like
            print(f"modnets: warning: {message}; training and results.json continue", file=sys.stderr, flush=True)
            self._warned = True

    def start(self, config: dict, name: str, directory: str, group: str | None = None, tags=()):
        if self.mode == "disabled":
            return _NullRun()
        free = free_bytes(directory)
        if free is not None and free < MIN_FREE_BYTES:
            self._warn(f"only {free} bytes free for W&B files in {directory}; W&B logging is off for this run")
            self.mode = "disabled"
            return _NullRun()
        if self._worker is None and not self.launch():
            return _NullRun()
        run_id = "".join(secrets.choice(ID_CHARS) for _ in range(8))
        kwargs = {
            "mode": self.mode, "project": self.project, "entity": self.entity, "group": self.group or group,
            "tags": list(dict.fromkeys([*self.tags, *tags])), "job_type": self.job_type, "name": name,
            "dir": directory, "config": config, "id": run_id,
        }
        run = _Run(self, len(self._runs), run_id, directory)
        self._runs.append(run)
        self._send({"op": "init", "run": run.index, "kwargs": kwargs, "timeouts": self._timeouts})
        return run

    def launch(self) -> bool:
        """Start the worker process (it imports wandb at once) and the thread that feeds it, so
        that logging never waits; `start` does it when not done before. False when W&B is off."""
        if self.mode == "disabled" or self._worker is not None:
            return self._worker is not None
        try:
            self._worker = subprocess.Popen(
                [sys.executable, "-m", "modnets.logger"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, env={**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": PYTHONPATH},
            )
        except OSError as e:
            self._warn(f"W&B failed (could not start its worker: {e})")
            self.mode = "disabled"
            return False
        self._queue = queue.SimpleQueue()
        self._feeder = threading.Thread(target=self._feed, daemon=True)
        self._feeder.start()
        return True

    def _send(self, message: dict) -> None:
        self._queue.put(message)

    def _feed(self) -> None:
        stdin = self._worker.stdin
        try:
            while (message := self._queue.get()) is not None:
                stdin.write(json.dumps(message, default=_encode).encode() + b"\n")
                if self._queue.empty():
                    stdin.flush()
        except (OSError, ValueError):  # the worker died: what it did not get is lost, training goes on
            pass

    def close(self, timeout: float | None = None) -> set[str]:
        """Wait until the worker has finished every run; the ids of the runs W&B really started."""
        if self._worker is None:
            return set()
        self._queue.put(None)
        self._feeder.join()
        try:
            out, _ = self._worker.communicate(timeout=timeout)  # closes its stdin: the worker finishes and reports
        except subprocess.TimeoutExpired:
            self._worker.kill()
            out, _ = self._worker.communicate()
        self._worker = None
        report = {}
        for line in out.decode(errors="replace").splitlines():
            try:
                report |= json.loads(line)
            except ValueError:
                continue
        if report.get("warning"):
            self._warn(report["warning"])
        elif "started" not in report:
            self._warn("W&B failed (its worker process ended without a report)")
        for directory in dict.fromkeys(r.directory for r in self._runs):
            free = free_bytes(directory)
            if free is not None and free < 1024**2:
                self._warn(f"the disk of {directory}/wandb is full ({free} bytes free); W&B files may be incomplete")
        return set(report.get("started", []))


def _serve() -> None:
    """The worker: read one JSON message a line from stdin until it closes; finish every run;
    print one JSON line {"started": [run ids], "warning": first failure or null}."""
    runs, started, warning = {}, [], None
    try:
        wandb = _import_wandb()
    except Exception as e:
        wandb, warning = None, f"W&B failed ({type(e).__name__}: {e})"
    spool = Path(tempfile.mkdtemp(prefix="modnets-wandb-"))
    for line in sys.stdin.buffer:
        message = json.loads(line)
        op, index = message["op"], message["run"]
        if wandb is None or (op == "init" and warning is not None):  # after one failed start, no more tries
            continue
        try:
            if op == "init":
                runs[index] = _init(wandb, message["kwargs"], message["timeouts"])
                started.append(runs[index].id)
            elif op == "log" and index in runs:
                runs[index].log(_decode(wandb, message["data"], spool), step=message["step"])
            elif op == "finish" and index in runs:
                run = runs.pop(index)
                run.summary.update(message["summary"])
                run.finish()
        except Exception as e:  # W&B must never cost a result
            warning = warning or f"W&B failed ({type(e).__name__}: {e})"
    for run in runs.values():  # this process was told nothing more: finish what is open
        try:
            run.finish()
        except Exception as e:
            warning = warning or f"W&B failed ({type(e).__name__}: {e})"
    shutil.rmtree(spool, ignore_errors=True)
    print(json.dumps({"started": started, "warning": warning}), flush=True)


def _import_wandb():
    """wandb, with two per-run costs of its start-up made once-per-worker (each a no-op change here):
    the list of installed packages each run records is read once (0.1-0.3 s a run), and W&B
    Launch's staged job inputs, which only a `wandb.sdk.launch` call in this process could have
    staged, are not looked for (the look imports W&B's Launch client: about a second)."""
    import wandb
    import wandb.util
    from wandb.sdk import wandb_run

    if hasattr(wandb.util, "working_set"):
        packages = list(wandb.util.working_set())
        wandb.util.working_set = lambda: iter(packages)
    if hasattr(wandb_run.Run, "_detect_and_apply_job_inputs"):
        wandb_run.Run._detect_and_apply_job_inputs = lambda self: None
    return wandb


def _decode(wandb, data: dict, spool: Path) -> dict:
    """Images (PNG bytes, base64; spooled to files that live until the worker ends, as W&B reads
    them when it writes the step) and tables back into W&B's objects; everything else as it is."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and "__image__" in value:
            path = spool / f"{len(list(spool.iterdir()))}-{key.replace('/', '_')}.png"
            path.write_bytes(base64.b64decode(value["__image__"]))
            value = wandb.Image(str(path))
        elif isinstance(value, dict) and "__table__" in value:
            value = wandb.Table(columns=value["__table__"]["columns"], data=value["__table__"]["rows"])
        out[key] = value
    return out


def _init(wandb, kwargs: dict, timeouts: dict):
    fields = getattr(wandb.Settings, "model_fields", {})
    settings = wandb.Settings(silent=True, console="off", **{k: v for k, v in timeouts.items() if k in fields})
    run = wandb.init(**kwargs, reinit="create_new", settings=settings)
    run.define_metric("epoch")
    run.define_metric("*", step_metric="epoch")
    for split in ("val", "heldout", "test"):
        run.define_metric(f"{split}_acc", summary="max")
    run.define_metric("val_loss", summary="min")
    return run


if __name__ == "__main__":
    _serve()
