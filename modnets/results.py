"""Results files: the contract between a run and every tool that reads it.

One `results.json` per run (per replicate), written atomically. A run is identified by
the hash of its resolved config, so that a relaunched sweep skips what already finished,
and a sweep job that raised leaves a `failed` results file instead of stopping the sweep.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def best_entry(history: list[dict]) -> dict:
    """The evaluation with the highest validation accuracy (ties: lower validation loss, then earlier)."""
    return max(history, key=lambda h: (h.get("val_acc", 0.0), -h.get("val_loss", 0.0), -h["epoch"]))


def dumps(data: dict) -> str:
    """JSON with one line per top-level key and one line per row of a list of rows (the history):
    readable, and written by json's C encoder (an indented dump runs its Python one, 2-3x slower)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            body = "[\n  " + ",\n  ".join(json.dumps(row) for row in value) + "\n ]"
        else:
            body = json.dumps(value)
        lines.append(f" {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_json(path: Path, data: dict) -> None:
    """Atomic write: a reader sees the old file or the whole new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(dumps(data))
        os.replace(tmp, path)
    except OSError:  # a full disk: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        raise


def replicate_config(cfg: DictConfig, r: int) -> dict:
    """The resolved config of replicate r: exactly the config of a single run with seed + r."""
    return replicate_configs(cfg, [r])[0]


def replicate_configs(cfg: DictConfig, replicates) -> list[dict]:
    """replicate_config of each r in `replicates`, resolving the config once (1024 seeds: once, not 1024 times)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    configs = []
    for r in replicates:
        config = copy.deepcopy(resolved)
        config["seed"] = int(cfg.seed) + r
        config["trainer"]["replicates"] = 1
        configs.append(config)
    return configs


def output_dirs(out: Path, seeds: list[int]) -> list[Path]:
    return [out] if len(seeds) == 1 else [out / f"seed_{s}" for s in seeds]


# Resumable sweeps. A run is identified by the hash of its replicate's resolved config, without the
# keys below (where it writes, how it logs); a job whose every replicate already has a results file
# with that hash and a final status is skipped, so a relaunched sweep runs only what is missing.
UNHASHED = ("output_dir", "logger", "trainer.progress", "trainer.threads", "trainer.checkpoint_every")
FINAL = ("completed", "diverged")


def config_hash(config: dict, ignore=UNHASHED) -> str:
    """A short hash of a resolved config without the keys in `ignore` (dotted paths)."""
    drop = {tuple(key.split(".")) for key in ignore}

    def kept(node, path=()):  # the config without the ignored keys (a copy; the config is left as it is)
        if not isinstance(node, dict):
            return node
        return {k: kept(v, (*path, k)) for k, v in node.items() if (*path, k) not in drop}

    return hashlib.sha256(json.dumps(kept(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_results(cfg: DictConfig) -> list[dict] | None:
    """The results of every replicate when all are on disk with this config's hash, else None."""
    seeds = [int(cfg.seed) + r for r in range(int(cfg.trainer.replicates))]
    base = replicate_config(cfg, 0)  # resolved once: replicate r differs only in its seed
    results = []
    for r, d in enumerate(output_dirs(Path(cfg.output_dir), seeds)):
        try:
            result = json.loads((d / "results.json").read_text())
        except (OSError, ValueError):
            return None
        if result.get("status") not in FINAL or result.get("config_hash") != config_hash(base | {"seed": seeds[r]}):
            return None
        results.append(result)
    return results or None


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(cfg: DictConfig, error: Exception) -> None:
    """A sweep job that raised: results.json with status `failed` and the error, so that the
    other jobs go on and the aggregator reports it."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        config = OmegaConf.to_container(cfg, resolve=False)
    message = f"{type(error).__name__}: {error}"
    out = Path(HydraConfig.get().runtime.output_dir)
    result = {"status": "failed", "error": message, "traceback": traceback.format_exc(), "config": config}
    write_json(out / "results.json", result | {"config_hash": config_hash(config), "git_commit": git_commit()})
    print(f"modnets: job {HydraConfig.get().job.num} failed ({out}): {message}", file=sys.stderr)
