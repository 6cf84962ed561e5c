"""Selection within a population: `trainer.select`.

A population is the R replicates of one run (`trainer.replicates`, seeds seed .. seed + R - 1,
trained as one batched model). With `trainer.select=train_loss` the replicate with the lowest
final *training* loss is chosen after training (ties: the lowest seed; diverged replicates are
never chosen). Every replicate still writes its own results.json, a record of the single run of its
seed; the run folder also gets `selected/results.json`: the chosen replicate's results, with the
population's config (its base seed, `trainer.replicates` and `trainer.select`) and

    selection: {criterion, among: [seeds], values: [criterion per seed], chosen: seed}

`params.population_*` and `flops.population_*` are the population's totals, the compute the
selected result cost. `trainer.population` = P splits the replicates into populations of P
consecutive seeds, each selected alone (`selected/seed_<base seed>/results.json`): 8 populations
of 32 train as one batched model of 256 replicates, each recorded as if run by itself. The
aggregator counts a selected result as one run of the configuration "best of R", beside the R
single runs it was chosen from.

Why only training rows: a choice that read validation, test or held-out rows would be fitted to
them, and the accuracy reported on those rows would no longer estimate accuracy on unseen rows.
`choose` is given the training losses and nothing else.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from modnets.results import config_hash, write_json

CRITERIA = ("none", "train_loss")


def choose(seeds: list[int], losses: list[float | None]) -> int | None:
    """The seed with the lowest finite loss (ties: the lowest seed); None when no loss is finite."""
    scored = [(loss, seed) for seed, loss in zip(seeds, losses) if loss is not None and math.isfinite(loss)]
    return min(scored)[1] if scored else None


def train_loss(result: dict) -> float | None:
    """A replicate's final training loss (None for a run that did not complete)."""
    final = result.get("final") or {}
    return final.get("train_loss") if result.get("status") == "completed" else None


def population_totals(values: dict | None, size: int, prefix: str = "population_") -> dict | None:
    """Per-replicate counts plus the population's totals (`population_<key>` = size x value)."""
    if not isinstance(values, dict):
        return values
    totals = {f"{prefix}{k}": v * size for k, v in values.items() if isinstance(v, (int, float)) and not k.startswith(prefix)}
    return {**values, **totals}


def populations(cfg: DictConfig) -> list[list[int]]:
    """The replicate indices of each population: consecutive groups of `trainer.population`
    (null: all replicates are one population)."""
    R = int(cfg.trainer.replicates)
    size = int(cfg.trainer.get("population") or R)  # a divisor of R (modnets.config.validate)
    return [list(range(start, start + size)) for start in range(0, R, size)]


def population_config(cfg: DictConfig, members: list[int]) -> dict:
    """The config of one population run by itself: its base seed, `trainer.replicates` = its size."""
    config = copy.deepcopy(OmegaConf.to_container(cfg, resolve=True))
    config["seed"] = int(cfg.seed) + members[0]
    config["trainer"]["replicates"] = len(members)
    config["trainer"]["population"] = None
    return config


def selected_result(cfg: DictConfig, results: list[dict], members: list[int]) -> dict | None:
    """The selected run of one population (None when none of its replicates completed)."""
    seeds = [int(cfg.seed) + r for r in members]
    losses = [train_loss(results[r]) for r in members]  # the only numbers the choice reads
    chosen = choose(seeds, losses)
    if chosen is None:
        return None
    config = population_config(cfg, members)
    best = results[members[seeds.index(chosen)]]
    return {
        **best,
        "config": config,
        "config_hash": config_hash(config),
        "params": population_totals(best.get("params"), len(members)),
        "flops": population_totals(best.get("flops"), len(members)),
        "selection": {"criterion": str(cfg.trainer.select), "among": seeds, "values": losses, "chosen": chosen},
    }


def selected_paths(cfg: DictConfig) -> list[Path]:
    """Where `write_selected` writes: one results file per population (none for select=none)."""
    if str(cfg.trainer.get("select", "none")) == "none":
        return []
    groups, out = populations(cfg), Path(cfg.output_dir) / "selected"
    return [(out if len(groups) == 1 else out / f"seed_{int(cfg.seed) + m[0]}") / "results.json" for m in groups]


def write_selected(cfg: DictConfig, results: list[dict], wandb=None) -> list[dict]:
    """Write each population's selected run: `selected/results.json` in the run folder, or
    `selected/seed_<base seed>/results.json` for several populations; with `wandb` = (logger,
    run name, group), also one W&B run each."""
    if str(cfg.trainer.get("select", "none")) == "none":
        return []
    written = []
    for members, path in zip(populations(cfg), selected_paths(cfg)):
        result = selected_result(cfg, results, members)
        out = path.parent
        if result is None:
            print(f"modnets: warning: no replicate of {out} completed, nothing selected", file=sys.stderr, flush=True)
            continue
        write_json(out / "results.json", result)
        if wandb is not None:
            log_selected(*wandb, result=result, out=out)
        written.append(result)
    return written


def log_selected(logger, name: str, group: str | None, result: dict, out: Path) -> None:
    """One W&B run for the selected result: its config, the chosen replicate's history and summary."""
    sel = result["selection"]
    run = logger.start(result["config"], f"{name}-selected-s{sel['chosen']}", str(out), group, ["selected"])
    history = result.get("history") or []
    step = max(1, math.ceil(len(history) / max(1, logger.max_points)))
    run.log_rows([row for i, row in enumerate(history) if i % step == 0 or i == len(history) - 1])
    summary = {f"final/{k}": v for k, v in (result.get("final") or {}).items()}
    summary |= {f"best/{k}": v for k, v in (result.get("best") or {}).items()}
    summary |= {f"recovery/{k}": v for k, v in (result.get("recovery") or {}).items() if isinstance(v, float)}
    summary |= {"selection/chosen": sel["chosen"], "selection/population": len(sel["among"])}
    run.finish(summary)
