"""Hydra's basic sweeper, minus the jobs that already finished: `hydra/sweeper=modnets` (the default).

Before a batch of jobs goes to the launcher (basic, joblib, submitit or any other), every job whose
replicates all have a final `results.json` of the same config (modnets.results.finished_results), and
with `trainer.select` its `selected/` files (modnets.selection.selected_paths), is
dropped, and the count is printed: a relaunched sweep submits only what is missing, so a cluster
spends no queue slot on a finished job. The jobs that remain keep their folders: when something was
dropped, each remaining job gets `hydra.sweep.subdir` pinned to the folder it would have had.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict, read_write

from modnets.progress import note_skipped


def job_config(loader, master: DictConfig, overrides: Sequence[str], num: int) -> DictConfig:
    """The config job `num` of a sweep will run with, its output folder resolved as run_job does."""
    cfg = loader.load_sweep_config(master, list(overrides))
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.job.num = num
        out = os.path.join(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir))
        cfg.hydra.runtime.output_dir = os.path.abspath(out)
    return cfg


def quote(value: str) -> str:
    return value if re.fullmatch(r"[\w.-]+", value) and not value.isdigit() else "'" + value.replace("'", "\\'") + "'"


def unfinished(loader, master: DictConfig, job_overrides, initial_job_idx: int) -> list[list[str]]:
    """The jobs of this batch without finished results; their subdir pinned when any was dropped."""
    from modnets.results import finished_results  # here: Hydra imports every plugin at start
    from modnets.selection import selected_paths  # a missing selection: the job runs, selects, trains nothing

    if next(Path(str(master.hydra.sweep.dir)).rglob("results.json"), None) is None:
        return [list(o) for o in job_overrides]  # a new sweep folder: nothing can be finished
    kept, saved = [], HydraConfig.instance().cfg
    try:
        for i, overrides in enumerate(job_overrides):
            try:
                cfg = job_config(loader, master, overrides, initial_job_idx + i)
                HydraConfig.instance().set_config(cfg)  # output_dir is ${hydra:runtime.output_dir}
                task_cfg = copy.deepcopy(cfg)
                with read_write(task_cfg), open_dict(task_cfg):
                    del task_cfg["hydra"]  # the job's config, as run_job hands it to the task
                done = finished_results(task_cfg) is not None and all(p.exists() for p in selected_paths(task_cfg))
            except Exception:  # a config that does not compose: the job itself reports it
                kept.append((list(overrides), None))
                continue
            if not done:
                kept.append((list(overrides), str(cfg.hydra.sweep.subdir)))
    finally:
        HydraConfig.instance().cfg = saved
    skipped = len(job_overrides) - len(kept)
    if skipped:
        note_skipped(skipped)
        print(f"modnets: {skipped} of {len(job_overrides)} jobs already finished (same config, completed): not launched",
              flush=True)
        return [o + ([f"hydra.sweep.subdir={quote(subdir)}"] if subdir is not None else []) for o, subdir in kept]
    return [o for o, _ in kept]


class ModnetsSweeper(BasicSweeper):
    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.launcher = SkipFinished(self.launcher, hydra_context.config_loader, config)


class SkipFinished:
    """A launcher that hands only the unfinished jobs of each batch to the real one."""

    def __init__(self, launcher, loader, config: DictConfig):
        self.launcher, self.loader, self.config = launcher, loader, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        todo = unfinished(self.loader, self.config, job_overrides, initial_job_idx)
        return self.launcher.launch(todo, initial_job_idx=initial_job_idx) if todo else []
