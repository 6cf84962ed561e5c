"""Weights & Biases logging: one W&B run per replicate, offline by default.

A failing W&B (bad mode, no network, full disk) warns once and training goes on:
the results file, not W&B, is the record of a run.
"""

from __future__ import annotations

import warnings

MODES = ("offline", "online", "disabled")


class _NullRun:
    id = None

    def log(self, metrics, step):
        pass

    def finish(self, summary=None):
        pass


class _Run:
    def __init__(self, logger, run):
        self.logger, self.run, self.id = logger, run, run.id

    def log(self, metrics, step):
        self.logger._guard(lambda: self.run.log(metrics, step=step))

    def finish(self, summary=None):
        if summary:
            self.logger._guard(lambda: self.run.summary.update(summary))
        self.logger._guard(self.run.finish)


class WandbLogger:
    """The `logger` group. `start()` opens one run; call `finish()` on every run it returns."""

    def __init__(self, mode="offline", project="modnets", entity=None, group=None, tags=(), job_type="train"):
        self.mode, self.project, self.entity = mode, project, entity
        self.group, self.tags, self.job_type = group, list(tags or []), job_type
        self._warned = False
        if mode not in MODES:
            self._warn(f"logger.mode={mode!r} is not one of {MODES}; W&B logging is off for this run")
            self.mode = "disabled"

    def _warn(self, message):
        if not self._warned:
            warnings.warn(f"modnets: {message}; training and results.json continue", stacklevel=3)
            self._warned = True

    def _guard(self, fn):
        try:
            return fn()
        except Exception as e:  # W&B must never cost a result
            self._warn(f"W&B failed ({type(e).__name__}: {e})")

    def start(self, config: dict, name: str, directory: str, group: str | None = None):
        if self.mode == "disabled":
            return _NullRun()

        def init():
            import wandb

            run = wandb.init(
                mode=self.mode,
                project=self.project,
                entity=self.entity,
                group=self.group or group,
                tags=self.tags,
                job_type=self.job_type,
                name=name,
                dir=directory,
                config=config,
                reinit="create_new",
                settings=wandb.Settings(silent=True, console="off"),
            )
            run.define_metric("epoch")
            run.define_metric("*", step_metric="epoch")
            for split in ("val", "heldout", "test"):
                run.define_metric(f"{split}_acc", summary="max")
            return run

        run = self._guard(init)
        return _Run(self, run) if run is not None else _NullRun()
