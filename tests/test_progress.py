"""Sweep progress lines (modnets.progress): jobs done / total, elapsed time, time left."""

import os
import re
import time

from omegaconf import OmegaConf
from test_train import cli

from modnets.progress import count_jobs, finished_jobs

BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def test_job_count_is_the_product_of_the_sweeps_including_sweeper_params():
    config = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"_target_": BASIC, "params": {"seed": "range(3)"}},
                "overrides": {"task": ["task.train_fraction=0.1,0.2", "trainer.epochs=2", "seed=0,1,2,3"]},
            }
        }
    )
    assert count_jobs(config) == 2 * 4  # a command-line sweep of a key replaces the preset's
    config.hydra.overrides.task = ["task.train_fraction=0.1,0.2", "model=modular,shared"]
    assert count_jobs(config) == 3 * 2 * 2
    config.hydra.sweeper._target_ = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert count_jobs(config) is None


def test_finished_jobs_counts_job_folders_with_results_written_since_the_start(tmp_path):
    for job in ("0", "1", "2/seed_1", "3"):
        (tmp_path / job).mkdir(parents=True)
    for path in ("0/results.json", "2/seed_1/results.json", "3/results.json"):
        (tmp_path / path).write_text("{}")
    start = time.time()
    os.utime(tmp_path / "3" / "results.json", (start - 60, start - 60))  # a job finished by an earlier launch
    assert finished_jobs(tmp_path, start - 1) == 2


def test_a_sweep_prints_one_line_per_job_with_done_total_elapsed_and_time_left(tmp_path):
    tiny = ["experiment=modular", "trainer.epochs=2", "logger.mode=disabled"]
    proc = cli("-m", "seed=1,2,3", *tiny, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("modnets: sweep")]
    pattern = r"modnets: sweep (\d)/3 jobs done, elapsed \d+:\d\d:\d\d, left ~\d+:\d\d:\d\d \(job (\d) completed\)"
    assert [re.fullmatch(pattern, line).groups() for line in lines] == [("1", "0"), ("2", "1"), ("3", "2")]
    assert proc.stdout.count("epoch ") >= 3  # each run's own progress lines are still there
    again = cli("-m", "seed=1,2,3,4", *tiny, f"hydra.sweep.dir={tmp_path}")  # 3 finished jobs are not launched
    lines = [line for line in again.stdout.splitlines() if line.startswith("modnets: sweep")]
    assert [re.fullmatch(pattern.replace("/3", "/1"), line).groups() for line in lines] == [("1", "0")], again.stdout
    single = cli(*tiny, f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0 and "modnets: sweep" not in single.stdout and "epoch     2/2" in single.stdout
