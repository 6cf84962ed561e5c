"""Sweep progress: one line per finished job of a Hydra multirun, with an estimate of the time left.

    modnets: sweep 3/12 jobs done, elapsed 0:01:05, left ~0:03:15 (job 2 completed)

Registered in conf/config.yaml as `hydra.callbacks.progress` (a Hydra Callback). The total is the
basic sweeper's job count (the product of the sweep overrides' lengths, `hydra.sweeper.params`
included); with another sweeper it is unknown and the line has no total or estimate. Jobs done are
counted in this process (the basic launcher runs every job here) or, for launchers with worker
processes (joblib), as the job folders holding results written since the sweep started. A single
run prints nothing here: its own progress lines are enough.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def count_jobs(config: DictConfig) -> int | None:
    """The number of jobs the basic sweeper (or modnets', its subclass) makes of this multirun config
    (None for another sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if not str(sweeper.get("_target_", "")).endswith(("BasicSweeper", "ModnetsSweeper")):
        return None
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
        return len(BasicSweeper.split_arguments(overrides, None)[0])
    except Exception:  # an override only the sweeper itself can expand: no total, no estimate
        return None


def finished_jobs(sweep_dir: Path, since: float) -> int:
    """Job folders of the sweep with a results.json (or seed_*/results.json) written since `since`."""
    if not sweep_dir.is_dir():
        return 0
    done = 0
    for job in (d for d in sweep_dir.iterdir() if d.is_dir()):
        files = [job / "results.json", *job.glob("seed_*/results.json")]
        done += any(f.is_file() and f.stat().st_mtime >= since for f in files)
    return done


SKIPPED = [0]  # jobs of this sweep the modnets sweeper did not launch (already finished)


def note_skipped(n: int) -> None:
    """Called by the modnets sweeper: `n` more jobs are finished already and will not run."""
    SKIPPED[0] += n


def clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class SweepProgress(Callback):
    def __init__(self, enabled: bool = True):
        self.enabled, self.start, self.total, self.done, self.sweep_dir = bool(enabled), None, None, 0, None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start, self.total, self.done = time.time(), count_jobs(config), 0
        SKIPPED[0] = 0
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def on_job_end(self, config: DictConfig, job_return, **kwargs: Any) -> None:
        if not self.enabled or self.start is None:  # a single run
            return
        self.done += 1
        done = max(self.done, finished_jobs(self.sweep_dir, self.start))
        elapsed = time.time() - self.start
        total = self.total and self.total - SKIPPED[0]  # the jobs launched
        line = f"modnets: sweep {done}/{total or '?'} jobs done, elapsed {clock(elapsed)}"
        if total:
            line += f", left ~{clock(elapsed / done * max(0, total - done))}"
        status = getattr(getattr(job_return, "status", None), "name", "done").lower()
        print(f"{line} (job {config.hydra.job.num} {status})", flush=True)
