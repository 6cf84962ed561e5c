"""Train one configuration: `modnets-train [overrides]` or `python -m modnets.train`.

Hydra composes `conf/config.yaml`; every object comes from its `_target_`. The whole
dataset lives on the device as tensors, minibatches are index gathers, and R replicates
(`trainer.replicates`, seeds `seed + r`) train as one batched model. Each replicate
writes its own `results.json` and its own W&B run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import hydra
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import modnets
from modnets.config import ConfigError, check
from modnets.models import count_parameters, parameter_groups

METRICS = ("loss", "acc", "exact")
ROOT = Path(__file__).resolve().parent.parent


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("trainer.device", name, "auto, cpu, cuda or cuda:N") from None
    check(device.type != "cuda" or torch.cuda.is_available(), "trainer.device", name, "auto or cpu: CUDA is not available here")
    check(device.type in ("cpu", "cuda", "mps"), "trainer.device", name, "auto, cpu, cuda or cuda:N")
    return device


class Evaluator:
    """Loss, bit accuracy and exact-match accuracy on every split in one batched pass.

    All rows of all splits are evaluated once (in chunks of `batch_size` rows) for every
    replicate; per-split means are one matmul with a [splits, rows] membership matrix.
    """

    def __init__(self, task, batch_size: int):
        self.task, self.batch_size = task, batch_size
        self.names = list(task.splits)
        self.rows = torch.unique(torch.cat(list(task.splits.values())))
        position = torch.full((len(task.x),), -1, dtype=torch.long, device=self.rows.device)
        position[self.rows] = torch.arange(len(self.rows), device=self.rows.device)
        self.membership = torch.zeros(len(self.names), len(self.rows), device=self.rows.device)
        for i, name in enumerate(self.names):
            rows = position[task.splits[name]]
            self.membership[i, rows] = 1.0 / len(rows)

    @torch.no_grad()
    def __call__(self, model, replicates: int) -> torch.Tensor:
        """Metrics [R, splits, 3] (loss, acc, exact), on the device."""
        model.eval()
        per_row = []
        for rows in self.rows.split(self.batch_size):
            x = self.task.x[rows]
            x = x.expand(replicates, *x.shape)
            y = self.task.y[rows].expand(replicates, -1, -1)
            logits = model(x, self.task.task_id[rows].expand(replicates, -1))
            loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(2)
            correct = (logits > 0) == (y > 0.5)
            per_row.append(torch.stack([loss, correct.float().mean(2), correct.all(2).float()], 2))
        model.train()
        return torch.einsum("rnm,sn->rsm", torch.cat(per_row, 1), self.membership)

    def as_dicts(self, metrics: torch.Tensor) -> list[dict[str, float]]:
        values = metrics.cpu().tolist()
        return [
            {f"{split}_{m}": v[s][j] for s, split in enumerate(self.names) for j, m in enumerate(METRICS)}
            for v in values
        ]


def draw_epoch(generators, n_train, x_shape, noise_std, noise_shapes, steps, per_sample, device):
    """Per replicate, from its own generator: the minibatch order of this epoch, the input
    noise of each draw and the Gumbel noise of each router. A single run with seed s draws
    exactly what replicate r = s - seed draws."""
    order, x_noise, r_noise = [], [], {name: [] for name in noise_shapes}
    for g in generators:
        order.append(torch.randperm(n_train, generator=g))
        if noise_std > 0:
            x_noise.append(torch.randn(n_train, *x_shape, generator=g) * noise_std)
        for name, shape in noise_shapes.items():
            u = torch.empty(n_train if per_sample else steps, *shape).exponential_(generator=g)
            r_noise[name].append(-torch.log(u))  # Gumbel(0, 1)
    stack = lambda ts: torch.stack(ts).to(device, non_blocking=True)  # noqa: E731
    return (
        stack(order),
        stack(x_noise) if x_noise else None,
        {name: stack(ts) for name, ts in r_noise.items()},
    )


def fit(cfg, task, model, optimizer, scheduler, generators, evaluator, on_eval) -> None:
    """The training loop: every epoch, shuffled minibatches; every `eval_every` epochs, metrics."""
    tr = cfg.trainer
    R = len(generators)
    train_rows = task.splits["train"]
    n_train, batch = len(train_rows), int(tr.batch_size)
    steps = math.ceil(n_train / batch)
    noise_shapes = model.noise_shapes()
    per_sample = bool(getattr(model, "noise_per_sample", False))
    for epoch in range(1, int(tr.epochs) + 1):
        order, x_noise, r_noise = draw_epoch(
            generators, n_train, task.x.shape[1:], task.noise, noise_shapes, steps, per_sample, task.x.device
        )
        rows = train_rows[order]  # [R, n_train]
        for s in range(steps):
            part = slice(s * batch, (s + 1) * batch)
            idx = rows[:, part]
            x = task.x[idx]
            if x_noise is not None:
                x = x + x_noise[:, part]
            noise = {k: v[:, part] if per_sample else v[:, s : s + 1] for k, v in r_noise.items()}
            logits = model(x, task.task_id[idx], noise)
            loss = F.binary_cross_entropy_with_logits(logits, task.y[idx], reduction="none").mean((1, 2)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        if epoch % int(tr.eval_every) == 0 or epoch == int(tr.epochs):
            on_eval(epoch, evaluator(model, R))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def best_entry(history: list[dict]) -> dict:
    """The evaluation with the highest validation accuracy (ties: lower validation loss, then earlier)."""
    return max(history, key=lambda h: (h.get("val_acc", 0.0), -h.get("val_loss", 0.0), -h["epoch"]))


def write_json(path: Path, data: dict) -> None:
    """Atomic write: a reader sees the old file or the whole new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def replicate_config(cfg: DictConfig, r: int) -> dict:
    """The resolved config of replicate r: exactly the config of a single run with seed + r."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved = copy.deepcopy(resolved)
    resolved["seed"] = int(cfg.seed) + r
    resolved["trainer"]["replicates"] = 1
    return resolved


def output_dirs(out: Path, seeds: list[int]) -> list[Path]:
    return [out] if len(seeds) == 1 else [out / f"seed_{s}" for s in seeds]


def build(cfg: DictConfig):
    """Task, routing, model, optimizer, scheduler and generators from the config.

    Objects are built as partials and then called, so that a ConfigError raised by a
    constructor reaches the user as itself, not wrapped by Hydra's instantiate.
    """
    tr = cfg.trainer
    check(int(tr.replicates) >= 1, "trainer.replicates", tr.replicates, "an integer >= 1")
    check(int(tr.epochs) >= 1, "trainer.epochs", tr.epochs, "an integer >= 1")
    check(int(tr.batch_size) >= 1, "trainer.batch_size", tr.batch_size, "an integer >= 1")
    check(int(tr.eval_every) >= 1, "trainer.eval_every", tr.eval_every, "an integer >= 1")
    check(float(cfg.optimizer.lr) > 0, "optimizer.lr", cfg.optimizer.lr, "a positive learning rate")
    device = resolve_device(str(tr.device))
    if tr.get("threads"):
        torch.set_num_threads(int(tr.threads))
    seeds = [int(cfg.seed) + r for r in range(int(tr.replicates))]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    task = instantiate(cfg.task, _partial_=True)()
    routing = instantiate(cfg.router, _partial_=True)()
    model = instantiate(cfg.model, _partial_=True)(task=task, routing=routing, generators=generators)
    model.to(device)
    task.to(device)
    optimizer = instantiate(cfg.optimizer)(parameter_groups(model, routing, float(cfg.optimizer.lr)))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=float(tr.lr_gamma))
    return SimpleNamespace(
        task=task, routing=routing, model=model, optimizer=optimizer, scheduler=scheduler,
        generators=generators, seeds=seeds, device=device,
    )


def run(cfg: DictConfig) -> list[dict]:
    """Build everything from the config, train, write one results.json per replicate."""
    start = time.time()
    tr = cfg.trainer
    b = build(cfg)
    task, model, seeds, device = b.task, b.model, b.seeds, b.device
    evaluator = Evaluator(task, int(tr.eval_batch_size))

    out = Path(cfg.output_dir)
    dirs = output_dirs(out, seeds)
    logger = instantiate(cfg.logger)
    group = f"{out.parent.name}/{out.name}" if len(seeds) > 1 else None
    configs = [replicate_config(cfg, r) for r in range(len(seeds))]
    name = f"{task.name}-{type(model).__name__.lower()}"
    runs = [logger.start(c, f"{name}-s{s}", str(d), group) for c, s, d in zip(configs, seeds, dirs)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)

    histories = [[] for _ in seeds]
    every = max(1, int(tr.epochs) // (int(tr.eval_every) * 10)) * int(tr.eval_every)

    def on_eval(epoch, metrics):
        rows = evaluator.as_dicts(metrics)
        for history, wandb_run, row in zip(histories, runs, rows):
            history.append({"epoch": epoch, **row})
            wandb_run.log({"epoch": epoch, **row}, step=epoch)
        if tr.progress and (epoch % every == 0 or epoch == int(tr.epochs)):
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
            line = f"epoch {epoch:>5}/{tr.epochs}  loss {mean['train_loss']:.4f}  acc train {mean['train_acc']:.3f}"
            line += f"  val {mean['val_acc']:.3f}  heldout {mean['heldout_acc']:.3f} (exact {mean['heldout_exact']:.3f})"
            print(line + (f"  [mean of {len(rows)} replicates]" if len(rows) > 1 else ""), flush=True)

    fit_start = time.time()
    fit(cfg, task, model, b.optimizer, b.scheduler, b.generators, evaluator, on_eval)
    train_time = time.time() - fit_start

    params = count_parameters(model, len(seeds))
    routings = model.routing_summary()
    commit = git_commit()
    results = []
    for r, (d, history, wandb_run) in enumerate(zip(dirs, histories, runs)):
        best = best_entry(history)
        result = {
            "status": "completed",
            "config": configs[r],
            "replicate": {"index": r, "of": len(seeds), "base_seed": int(cfg.seed)},
            "history": history,
            "final": history[-1],
            "best": best,
            "params": params,
            "routing": routings[r],
            "train_time_s": train_time,
            "wall_time_s": time.time() - start,
            "device": str(device),
            "modnets_version": modnets.__version__,
            "git_commit": commit,
            "wandb_id": wandb_run.id,
        }
        write_json(d / "results.json", result)
        summary = {f"final/{k}": v for k, v in history[-1].items()}
        summary |= {f"best/{k}": v for k, v in best.items()}
        wandb_run.finish(summary)
        results.append(result)
    return results


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        results = run(cfg)
    except ConfigError as e:
        print(f"modnets: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return sum(r["final"]["heldout_acc"] for r in results) / len(results)


if __name__ == "__main__":
    main()
