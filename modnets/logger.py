"""Weights & Biases logging: one W&B run per replicate, offline by default.

A failing W&B (bad mode, no network, full disk) warns once, on one stderr line, and training
goes on: the results file, not W&B, is the record of a run. `wandb.init` gives up after
`init_timeout` seconds (no network for `online`), and after one failed start the logger opens no
more runs, so R replicates cost one timeout, not R; `finish` waits at most `finish_timeout`
seconds for uploads. A W&B directory on a (nearly) full disk is reported the same way.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

MODES = ("offline", "online", "disabled")
MIN_FREE_BYTES = 16 * 1024**2  # W&B is not started in a folder with less free space than this


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
    live = True

    def __init__(self, logger, run, directory):
        self.logger, self.run, self.id, self.directory = logger, run, run.id, directory

    def log(self, metrics, step):
        self.logger._guard(lambda: self.run.log(metrics, step=step))

    def log_image(self, key: str, path, step: int) -> None:
        """An image file (a copy is made: the file may change afterwards)."""
        import wandb

        self.logger._guard(lambda: self.run.log({key: wandb.Image(str(path))}, step=step))

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        import wandb

        self.logger._guard(lambda: self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step))

    def finish(self, summary=None):
        if summary:
            self.logger._guard(lambda: self.run.summary.update(summary))
        self.logger._guard(self.run.finish)
        free = free_bytes(self.directory)
        if free is not None and free < 1024**2:
            self.logger._warn(f"the disk of {self.directory}/wandb is full ({free} bytes free); W&B files may be incomplete")


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
    ):
        self.max_points = int(max_points)  # W&B charts sample long histories anyway; results.json keeps them all
        self.pictures = bool(pictures)  # circuit.png and W&B images of modular runs (false: matplotlib is never imported)
        self.mode, self.project, self.entity = mode, project, entity
        self.group, self.tags, self.job_type = group, list(tags or []), job_type
        self.init_timeout, self.finish_timeout = init_timeout, finish_timeout
        self._warned = False
        if mode not in MODES:
            self._warn(f"logger.mode={mode!r} is not one of {MODES}; W&B logging is off for this run")
            self.mode = "disabled"

    def _warn(self, message):
        if not self._warned:
            message = " ".join(str(message).split())  # one line, whatever W&B's message looks like
            print(f"modnets: warning: {message}; training and results.json continue", file=sys.stderr, flush=True)
            self._warned = True

    def _guard(self, fn):
        try:
            return fn()
        except Exception as e:  # W&B must never cost a result
            self._warn(f"W&B failed ({type(e).__name__}: {e})")

    def start(self, config: dict, name: str, directory: str, group: str | None = None, tags=()):
        if self.mode == "disabled":
            return _NullRun()
        free = free_bytes(directory)
        if free is not None and free < MIN_FREE_BYTES:
            self._warn(f"only {free} bytes free for W&B files in {directory}; W&B logging is off for this run")
            self.mode = "disabled"
            return _NullRun()

        def init():
            import wandb

            fields = getattr(wandb.Settings, "model_fields", {})
            timeouts = {"init_timeout": float(self.init_timeout), "finish_timeout": float(self.finish_timeout)}
            run = wandb.init(
                mode=self.mode,
                project=self.project,
                entity=self.entity,
                group=self.group or group,
                tags=list(dict.fromkeys([*self.tags, *tags])),
                job_type=self.job_type,
                name=name,
                dir=directory,
                config=config,
                reinit="create_new",
                settings=wandb.Settings(silent=True, console="off", **{k: v for k, v in timeouts.items() if k in fields}),
            )
            run.define_metric("epoch")
            run.define_metric("*", step_metric="epoch")
            for split in ("val", "heldout", "test"):
                run.define_metric(f"{split}_acc", summary="max")
            run.define_metric("val_loss", summary="min")
            return run

        run = self._guard(init)
        if run is None:  # W&B could not start: no further tries (each could wait init_timeout)
            self.mode = "disabled"
            return _NullRun()
        return _Run(self, run, directory)
