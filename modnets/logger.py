"""Weights & Biases logging: one W&B run per replicate, offline by default.

W&B runs in a worker process (`python -m modnets.logger`). The `modnets-train` command starts it
first thing (`prelaunch`, before torch is imported) when its command line looks like one run with
W&B on; otherwise the first `start()` launches it. Importing wandb and starting W&B's service cost
about a second of CPU, which the worker spends on the other core while this process imports torch
and trains. `log`, `log_rows` and `finish` only queue a line for it; `settle()` waits until it
has finished the runs finished so far (and keeps it for more), `close()` until it has finished
every run and ended. Run ids are chosen here, so
the results file names its W&B run without asking the worker. History rows travel in chunks
(`log_rows`), which the worker hands to W&B's service in one go rather than one `log` call a row.

A failing W&B (bad mode, no network, full disk) warns once, on one stderr line, and training
goes on: the results file, not W&B, is the record of a run. `wandb.init` gives up after
`init_timeout` seconds (no network for `online`), and after one failed start the worker opens
no more runs, so R replicates cost one timeout, not R; `finish` waits at most `finish_timeout`
seconds for uploads. A W&B directory on a (nearly) full disk is reported the same way.
`log_image` sends the image file's bytes, `log_table` the rows and `log_picture` what a circuit
picture shows (the worker draws it, `modnets.draw`): the worker makes W&B's objects.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

MODES = ("offline", "online", "disabled")
MIN_FREE_BYTES = 16 * 1024**2  # W&B is not started in a folder with less free space than this
ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"  # W&B's own run-id alphabet
PYTHONPATH = os.pathsep.join([str(Path(__file__).resolve().parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])])


PRELAUNCHED: list[subprocess.Popen] = []  # the worker `prelaunch` started, until a logger adopts it
# flags of a command line that is no single run, or not one to start W&B for
SWEEP_FLAGS = ("-m", "--multirun", "-h", "--help", "--hydra-help", "-i", "--info", "-c", "--cfg", "-p", "--package",
               "--shell-completion", "-sc", "--version", "--resolve", "--experimental-rerun")


def _popen() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "modnets.logger"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env={**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": PYTHONPATH},
    )


def single_run_with_wandb(argv: list[str], conf_dir: Path) -> bool:
    """Whether a `modnets-train` command line (its arguments, not composed: Hydra is not imported
    yet) looks like one run with W&B on: no multirun or information flag, no `logger` override
    that says `disabled`, and no `experiment=` preset that turns W&B off or sweeps. A guess that
    only decides when the worker starts: a wrong one costs an early start or a later one."""
    for arg in argv:
        if arg.split("=")[0] in SWEEP_FLAGS or arg.startswith("hydra.mode") or ("logger" in arg and "disabled" in arg):
            return False
        if arg.startswith(("experiment=", "+experiment=")):
            try:
                text = (conf_dir / "experiment" / f"{arg.split('=', 1)[1]}.yaml").read_text()
            except (OSError, ValueError):
                continue
            if re.search(r"^\s*mode:\s*(disabled|MULTIRUN)\b", text, re.M):
                return False
    return True


def prelaunch(argv: list[str], conf_dir: Path) -> None:
    """Start the worker now (before torch's import, which it overlaps) when the command line looks
    like one run with W&B on; the run's logger adopts it (`WandbLogger.launch`), else `discard`."""
    if not PRELAUNCHED and single_run_with_wandb(argv, conf_dir):
        try:
            PRELAUNCHED.append(_popen())
        except OSError:
            pass  # the logger tries again, and warns


def discard() -> None:
    """End a prelaunched worker that no logger adopted (W&B off, a config error): it holds no run."""
    while PRELAUNCHED:
        worker = PRELAUNCHED.pop()
        worker.kill()
        worker.wait()


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

    def log_rows(self, rows):
        pass

    def log_image(self, key, path, step):
        pass

    def log_table(self, key, columns, rows, step):
        pass

    def log_picture(self, key, result, step):
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

    def log_rows(self, rows: list[dict]) -> None:
        """History rows, each {"epoch": its step, metric: number, ...}, in increasing epochs: what one
        `log(row, step=row["epoch"])` per row writes, in one message (and one hand-off to W&B)."""
        if rows:
            self.logger._send({"op": "rows", "run": self.index, "rows": rows})

    def log_image(self, key: str, path, step: int) -> None:
        """An image file (its bytes are read now: the file may change afterwards)."""
        try:
            data = base64.b64encode(Path(path).read_bytes()).decode()
        except OSError as e:
            return self.logger._warn(f"W&B failed (cannot read image {path}: {e})")
        self.logger._send({"op": "log", "run": self.index, "data": {key: {"__image__": data}}, "step": step})

    def log_picture(self, key: str, result: dict, step: int) -> None:
        """The circuit picture of `result` (what `modnets.draw.picture_of` reads: routing, modules,
        circuits, config), drawn by the worker: the training process spends no time drawing."""
        self.logger._send({"op": "log", "run": self.index, "data": {key: {"__picture__": result}}, "step": step})

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
        """Start the worker process (it imports wandb and starts W&B's service at once), or adopt
        the one `prelaunch` started, and the thread that feeds it, so that logging never waits;
        `start` does it when not done before. False when W&B is off."""
        if self.mode == "disabled" or self._worker is not None:
            return self._worker is not None
        try:
            self._worker = PRELAUNCHED.pop() if PRELAUNCHED else _popen()
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

    def settle(self) -> set[str]:
        """Wait until the worker has finished every run finished so far, and keep it for more runs
        (the selected run: no second worker, no second W&B start-up); the ids of the runs W&B
        really started. When the worker is gone, what `close` says."""
        if self._worker is None:
            return set()
        self._send({"op": "report"})
        while line := self._worker.stdout.readline():
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if "started" in report:
                if report.get("warning"):
                    self._warn(report["warning"])
                return set(report["started"])
        return self.close()

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
    print one JSON line {"started": [run ids], "warning": first failure or null} (and one after
    each `report` message, with what started so far)."""
    runs, started, warning = {}, [], None
    pictures: dict[int, dict] = {}  # per run, per key: (what the last picture drawn shows, its file)
    try:
        wandb = _import_wandb()
        wandb.setup()  # W&B's service starts now, before the first run's config arrives
    except Exception as e:
        wandb, warning = None, f"W&B failed ({type(e).__name__}: {e})"
    spool = Path(tempfile.mkdtemp(prefix="modnets-wandb-"))
    for line in sys.stdin.buffer:
        message = json.loads(line)
        op, index = message["op"], message.get("run")
        if op == "report":  # every message before this one is done: say what started so far
            print(json.dumps({"started": started, "warning": warning}), flush=True)
            continue
        if wandb is None or (op == "init" and warning is not None):  # after one failed start, no more tries
            continue
        try:
            if op == "init":
                runs[index] = _init(wandb, message["kwargs"], message["timeouts"])
                started.append(runs[index].id)
            elif op == "log" and index in runs:
                drawn = pictures.setdefault(index, {})
                runs[index].log(_decode(wandb, message["data"], spool, drawn), step=message["step"])
            elif op == "rows" and index in runs:
                _log_rows(runs[index], message["rows"])
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
    if wandb is not None:
        try:
            wandb.teardown()  # W&B's service ends (every run is finished and its files complete)
        except Exception as e:
            warning = warning or f"W&B failed ({type(e).__name__}: {e})"
    print(json.dumps({"started": started, "warning": warning}), flush=True)


def _import_wandb():
    """wandb, with two per-run costs of its start-up made once-per-worker (each a no-op change here):
    the list of installed packages each run records is read once (0.1-0.3 s a run), and W&B
    Launch's staged job inputs, which only a `wandb.sdk.launch` call in this process could have
    staged, are not looked for (the look imports W&B's Launch client: about a second). While wandb
    is imported, pydantic does not read the source of W&B's settings classes for their fields'
    docstrings (descriptions for documentation, unused by a run: about 0.15 s of the import)."""
    with _no_attribute_docstrings():
        import wandb
    import wandb.util
    from wandb.sdk import wandb_run

    if hasattr(wandb.util, "working_set"):
        packages = list(wandb.util.working_set())
        wandb.util.working_set = lambda: iter(packages)
    _cache_git(wandb)
    if hasattr(wandb_run.Run, "_detect_and_apply_job_inputs"):
        wandb_run.Run._detect_and_apply_job_inputs = lambda self: None
    return wandb


@contextlib.contextmanager
def _no_attribute_docstrings():
    """pydantic's reading of class sources for fields' docstrings off, inside the block (another
    pydantic version without it: as it is)."""
    try:
        from pydantic._internal import _fields
    except ImportError:
        yield
        return
    original = getattr(_fields, "_update_fields_from_docstrings", None)
    if original is not None:
        _fields._update_fields_from_docstrings = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if original is not None:
            _fields._update_fields_from_docstrings = original


def _log_rows(run, rows: list[dict]) -> None:
    """Write history rows as `run.log(row, step=row["epoch"])` row by row would: the same
    records, with W&B's own value encoding, handed to W&B's service in one go. A `log` call
    costs about 0.2 ms, most of it waiting once per row for W&B's asyncio thread, telemetry and
    media checks that numbers don't need; this is a few times cheaper. Rows holding anything but
    numbers, or another wandb version's internals: row by row, the public way."""
    try:
        send = _history_sender(run, rows)
    except Exception:
        send = None
    if send is None:
        for row in rows:
            run.log(row, step=int(row["epoch"]))
        return
    run._interface._asyncer.run(send)
    run._local_step = max(run._local_step, int(rows[-1]["epoch"]))


def _history_sender(run, rows: list[dict]):
    """An async function that publishes one partial-history record per row (as W&B's
    `publish_partial_history` builds it: the values, `_timestamp`, the step), or None when a
    value is not a plain number."""
    import time

    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.proto import wandb_server_pb2 as spb
    from wandb.sdk.interface.history_value import set_history_value

    if not all(type(v) in (int, float, bool) for row in rows for v in row.values()):
        return None
    interface = run._interface
    encoding = run._settings.x_history_value_encoding.split(",")
    forms = {"json_form": "json" in encoding, "typed_form": "typed" in encoding}
    rows = [{"_timestamp": time.time()} | row for row in rows]  # a row's own time, if it has one
    texts = _number_texts([v for row in rows for v in row.values()]) if encoding == ["json"] else None
    requests = []
    for row in rows:
        history = pb.PartialHistoryRequest()
        for key, value in row.items():
            item = history.item.add()
            item.key = key
            if texts is not None:
                item.value_json = next(texts)
            else:
                set_history_value(item, value, **forms)
        history.step.num = int(row["epoch"])
        record = interface._make_request(partial_history=history)
        interface._assign(record)
        request = spb.ServerRequest()
        request.record_publish.CopyFrom(record)
        requests.append(request)

    async def send():
        for request in requests:
            await interface._client.publish(request)

    return send


def _number_texts(values: list) -> Iterator[str] | None:
    """Each number's json text as W&B's history encoder writes it alone (`value_json`), from one
    encoding of the whole list: a list of numbers is their texts joined by commas (and spaces,
    for the standard library's json). None when the split does not give one text per value."""
    from wandb.util import json_dumps_safer_history

    texts = [t.strip() for t in json_dumps_safer_history(values)[1:-1].split(",")] if values else []
    return iter(texts) if len(texts) == len(values) else None


def _cache_git(wandb) -> None:
    """Each `wandb.init` asks git the same four questions (repository root, remote, commit),
    each a subprocess: ask once per worker (answers, errors too, by command and folder)."""
    try:
        from wandb.sdk.lib import gitlib
    except ImportError:
        return
    ask, answers = getattr(gitlib, "run_git", None), {}
    if ask is None:
        return

    def run_git(*args, cwd=None, **kwargs):
        key = (args, cwd, tuple(sorted(kwargs.items())))
        if key not in answers:
            try:
                answers[key] = (ask(*args, cwd=cwd, **kwargs), None)
            except Exception as e:
                answers[key] = (None, e)
        answer, error = answers[key]
        if error is not None:
            raise error
        return answer

    gitlib.run_git = run_git


def _decode(wandb, data: dict, spool: Path, drawn: dict) -> dict:
    """Images (PNG bytes, base64; spooled to files that live until the worker ends, as W&B reads
    them when it writes the step), circuit pictures (drawn here, into the spool, unless the run's
    last picture under that key shows the same: `drawn`) and tables back into W&B's objects;
    everything else as it is."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and "__picture__" in value:
            from modnets.draw import draw_changed  # Pillow and numpy, not torch

            last, _ = drawn.get(key, (None, None))
            fresh = spool / f"{secrets.token_hex(8)}-{key.replace('/', '_')}.png"  # a new file: W&B may not have read the last
            shown = draw_changed(value["__picture__"], fresh, last)
            if shown is None:
                continue
            if shown != last:
                drawn[key] = (shown, fresh)
            value = wandb.Image(str(drawn[key][1]))
        elif isinstance(value, dict) and "__image__" in value:
            path = spool / f"{secrets.token_hex(8)}-{key.replace('/', '_')}.png"
            path.write_bytes(base64.b64decode(value["__image__"]))
            value = wandb.Image(str(path))
        elif isinstance(value, dict) and "__table__" in value:
            value = wandb.Table(columns=value["__table__"]["columns"], data=value["__table__"]["rows"])
        out[key] = value
    return out


def _no_usage_metrics() -> None:
    """Turn off, for this process, the usage metrics (OpenTelemetry) that W&B's SDK sends to W&B's
    servers. The SDK leaves them off in a process whose global mode is offline; this worker sets
    the mode per run, so an offline run built them: requests and the OpenTelemetry SDK imported,
    about 0.1 s of CPU beside training, for an export that could not happen. Not in the run's files."""
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy

        opentelemetry_proxy.disable()
    except (ImportError, AttributeError):  # another wandb version: as it is
        pass


def _init(wandb, kwargs: dict, timeouts: dict):
    if kwargs.get("mode") == "offline":
        _no_usage_metrics()
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
    os._exit(0)  # all done and reported: skip the interpreter's teardown of wandb's modules (0.1 s)
