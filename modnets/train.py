"""Train one configuration: `modnets-train [overrides]` or `python -m modnets.train`.

Hydra composes `conf/config.yaml`; every object comes from its `_target_`. The whole
dataset lives on the device as tensors, minibatches are index gathers, and R replicates
(`trainer.replicates`, seeds `seed + r`) train as one batched model. Each replicate
writes its own `results.json` and its own W&B run.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # `python -m modnets.train` is the `modnets-train` command, which imports this module itself
    from modnets import cli

    cli()  # never returns: W&B's worker starts before the imports below (modnets.cli)

import math
import os
import time
from itertools import chain, repeat
from pathlib import Path
from types import SimpleNamespace

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

import modnets
from modnets import checkpoint, draw, recovery, routers, selection
from modnets.checkpoint import NAME as CHECKPOINT
from modnets.checkpoint import Checkpointer
from modnets.config import (
    ConfigError,
    check,
    check_memory,
    check_model_memory,
    compose_once,
    data_estimate,
    one_line_errors,
    sanity_warnings,
    validate,
)
from modnets.contracts import Model
from modnets.models import count_flops, count_parameters, parameter_groups
from modnets.optim import ExponentialLR
from modnets.permutations import Permutations
from modnets.results import (
    FolderBusy,
    RunError,
    arch_label,
    best_entry,
    clear_failure,
    config_hash,
    finished_results,
    git_commit,
    in_sweep,
    lock_folder,
    one_line,
    os_problem,
    output_dirs,
    paused_gc,
    record_failure,
    replicate_configs,
    warn,
    write_json,
    write_jsons,
)
from modnets.step import hand_step
from modnets.tasks import Task

METRICS = ("loss", "acc", "exact")
RUNS: list[bool] = []  # per call of `main` in this process: was it a sweep job (modnets.cli ends single runs fast)


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
            self.membership[i, rows] = 1.0
        self.counts = self.membership.sum(1)[:, None]  # sums of 0/1 then one division: 13/13 is exactly 1
        self.modules = None  # (model, its modules) for `train`

    @torch.no_grad()
    def __call__(self, model, replicates: int, hard: bool = True) -> torch.Tensor:
        """Metrics [R, splits, 3] (loss, acc, exact), on the device. `hard=False`: the routers'
        training-mode forward without noise (a soft router's mixture), for the discretisation gap."""
        self.train(model, not hard)
        per_row = []
        for rows in self.rows.split(self.batch_size):
            x = self.task.x[rows]
            x = x.expand(replicates, *x.shape)
            y = self.task.y[rows].expand(replicates, -1, -1)
            logits = model(x, self.task.task_id[rows].expand(replicates, -1))
            loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(2)
            correct = (logits > 0) == (y > 0.5)
            per_row.append(torch.stack([loss, correct.float().mean(2), correct.all(2).float()], 2))
        self.train(model, True)
        per_row = per_row[0] if len(per_row) == 1 else torch.cat(per_row, 1)
        return torch.einsum("rnm,sn->rsm", per_row, self.membership) / self.counts

    def train(self, model, mode: bool) -> None:
        """`model.train(mode)` without nn.Module's walk of the module tree each time: every module's
        flag set from a list made once (when no module overrides `train`; else `model.train`)."""
        if self.modules is None or self.modules[0] is not model:
            modules = list(model.modules())
            self.modules = (model, modules if all(type(m).train is torch.nn.Module.train for m in modules) else None)
        if self.modules[1] is None:
            model.train(mode)
            return
        for m in self.modules[1]:
            m.training = mode

    @property
    def keys(self) -> list[str]:
        """The metric names in the order of metrics[r].flatten(): split_metric."""
        return [f"{split}_{m}" for split in self.names for m in METRICS]

    def discretisation_gap(self, model, replicates: int) -> list[dict[str, float]] | None:
        """Per replicate, soft minus hard accuracy (train and held-out rows) of a soft router
        method at its final temperature; None for methods whose training forward is hard."""
        method = getattr(model, "routing", None)
        if method is None or not method.soft:
            return None
        gap = (self(model, replicates, hard=False) - self(model, replicates))[:, :, 1].cpu().tolist()
        return [{f"discretisation_gap_{split}": g[s] for s, split in enumerate(self.names) if split in ("train", "heldout")}
                for g in gap]

    def as_dicts(self, metrics: torch.Tensor) -> list[dict[str, float]]:
        return [dict(zip(self.keys, chain.from_iterable(v))) for v in metrics.cpu().tolist()]


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


MANY = 64  # replicates from which the minibatch orders are drawn all at once (modnets.permutations)


def orders_at_once(generators: list[torch.Generator], n_train: int, plain: bool) -> Permutations | None:
    """The replicates' minibatch orders drawn all at once (`Permutations`: the numbers of one
    `torch.randperm` per replicate, 3-4 times faster from 1024 replicates) when that pays and is
    exact: 64+ replicates, `plain` (nothing else to draw: no input or router noise, and no
    checkpoint, which saves the generators), generators whose states it can read. Else None."""
    return Permutations.of(generators, n_train) if plain and len(generators) >= MANY else None


class LastFinite:
    """Every replicate's weights at its last finite evaluation. A replicate that diverges keeps
    the copy taken before its NaN, and `restore` writes it back into the model when training
    ends, so that its routing and recovery describe the model its history ends with (the initial
    weights when it diverged before its first evaluation). Costs one copy of the parameters."""

    def __init__(self, model, replicates: int):
        self.params = [p for p in model.parameters() if p.shape[:1] == (replicates,)]
        self.snapshot = [p.detach().clone() for p in self.params]
        self.kept: dict[int, list[torch.Tensor]] = {}

    @torch.no_grad()
    def evaluated(self) -> None:
        for s, p in zip(self.snapshot, self.params):
            s.copy_(p)

    def diverged(self, r: int) -> None:
        self.kept[r] = [s[r].clone() for s in self.snapshot]

    @torch.no_grad()
    def restore(self) -> None:
        for r, slices in self.kept.items():
            for p, s in zip(self.params, slices):
                p[r] = s

    def state(self) -> dict:
        """For the checkpoint; the snapshot only when it is not the weights themselves (checkpointed
        right after an evaluation, the usual case, it is)."""
        cpu = lambda ts: [t.cpu() for t in ts]  # noqa: E731
        same = all(torch.equal(s, p) for s, p in zip(self.snapshot, self.params))
        return {"snapshot": None if same else cpu(self.snapshot), "kept": {r: cpu(ts) for r, ts in self.kept.items()}}

    @torch.no_grad()
    def load(self, state: dict) -> None:  # after the model's weights are loaded
        for s, t in zip(self.snapshot, state["snapshot"] or self.params, strict=True):
            s.copy_(t)
        self.kept = {int(r): [t.to(s.device) for t, s in zip(ts, self.snapshot)] for r, ts in state["kept"].items()}


def autograd_step(model, batch: tuple, progress: float) -> torch.Tensor:
    """Forward and gradients of one minibatch through autograd, for models the hand step does not
    cover (modnets.step): batch = (x, y, task ids, router noise). Every replicate's mean loss [R]."""
    x, y, task_id, noise = batch
    method = getattr(model, "routing", None)  # the router method's extra loss terms
    per_output = F.binary_cross_entropy_with_logits(model(x, task_id, noise), y, reduction="none")
    losses = per_output.mean((1, 2))
    extra = method.loss(model, per_output, progress) if method is not None else None
    (losses.sum() if extra is None else losses.sum() + extra.sum()).backward()
    return losses


class Divergence:
    """The replicates whose training loss (or last evaluation) went NaN or inf: {replicate: epoch},
    each reported on one stderr line when it happens; `LastFinite` keeps its weights from before."""

    def __init__(self, diverged: dict[int, int], last_finite: LastFinite, seed: int):
        self.diverged, self.last_finite, self.seed = diverged, last_finite, seed

    def check(self, epoch: int, epoch_loss: torch.Tensor, metrics: torch.Tensor | None) -> bool:
        """Note the replicates that diverged in this epoch (one host sync); True when all have."""
        R = len(epoch_loss)
        finite = torch.isfinite(epoch_loss)
        if metrics is not None:  # the last step of the epoch may be the one that broke the weights
            finite &= torch.isfinite(metrics).flatten(1).all(1)
        for r in (~finite).nonzero().flatten().tolist():
            if r not in self.diverged:
                self.diverged[r] = epoch
                self.last_finite.diverged(r)
                who = f"seed {self.seed + r}" + (f", replicate {r} of {R}" if R > 1 else "")
                then = "the other replicates train on" if len(self.diverged) < R else "training stopped"
                print(
                    f"modnets: diverged: NaN or inf loss in epoch {epoch} ({who}); its results.json gets status "
                    f"'diverged' with the evaluations before it, {then} (try a lower optimizer.lr)",
                    file=sys.stderr, flush=True,
                )
        return len(self.diverged) == R


def fit(cfg, task, model, optimizer, scheduler, generators, evaluator, on_eval, extra_state=None) -> dict[int, int]:
    """The training loop: every epoch, shuffled minibatches; every `eval_every` epochs, metrics.

    With `trainer.checkpoint_every` N > 0 it checkpoints every N epochs into the output folder and
    resumes from a checkpoint of the same config found there (modnets.checkpoint): the evaluations
    so far are replayed through on_eval, and `extra_state` (name -> list that on_eval fills from
    the model, not from the metrics) is checkpointed and restored in place. Returns the
    replicates that diverged, {replicate: epoch}: a replicate whose training loss is NaN or inf
    in an epoch (checked once per epoch) is reported; the others train on (replicates never mix),
    and training stops when every replicate has diverged. A diverged replicate's weights are put
    back to those of its last finite evaluation (`LastFinite`). The checkpoint stays: the caller
    removes it (`modnets.checkpoint.remove`) once the results are safely written.
    """
    tr = cfg.trainer
    R = len(generators)
    train_rows = task.splits["train"]
    n_train, batch = len(train_rows), int(tr.batch_size)
    steps = math.ceil(n_train / batch)
    noise_shapes = routers.noise_shapes(model)
    per_sample = bool(getattr(model, "noise_per_sample", False))
    method = getattr(model, "routing", None)  # the router method: temperature schedule, extra loss terms
    hand = hand_step(model, method) if not noise_shapes else None  # forward and gradients by hand (modnets.step)
    last_finite = LastFinite(model, R)
    saver = Checkpointer(cfg, model, optimizer, scheduler, generators, extra_state, last_finite)
    start = saver.resume()
    for epoch, metrics in saver.evals:  # the history so far, as if it had just been evaluated
        on_eval(epoch, metrics.to(task.x.device))
    saver.restore_extra()
    divergence = Divergence(saver.diverged, last_finite, seed=int(cfg.seed))
    plain = task.noise <= 0 and not noise_shapes and saver.path is None
    orders = orders_at_once(generators, n_train, plain)
    for epoch in range(start + 1, int(tr.epochs) + 1):
        progress = (epoch - 1) / max(1, int(tr.epochs) - 1)
        if method is not None:
            method.schedule(model, progress)
        epoch_loss = torch.zeros(R, device=task.x.device)
        if orders is not None:  # what draw_epoch would draw, all replicates at once
            order, x_noise, r_noise = orders(n_train).to(task.x.device), None, {}
        else:
            order, x_noise, r_noise = draw_epoch(
                generators, n_train, task.x.shape[1:], task.noise, noise_shapes, steps, per_sample, task.x.device
            )
        rows = train_rows[order]  # [R, n_train]
        x_epoch = task.x[rows] if x_noise is None else task.x[rows] + x_noise  # the epoch's inputs, gathered once
        xs, ys, ids = (t.split(batch, 1) for t in (x_epoch, task.y[rows], task.task_id[rows]))
        for s in range(steps):
            optimizer.zero_grad(set_to_none=True)
            if hand is not None:  # the same numbers as autograd_step, without its graph
                losses = hand(xs[s], ys[s])
            else:
                part = slice(s * batch, (s + 1) * batch)
                noise = {k: v[:, part] if per_sample else v[:, s : s + 1] for k, v in r_noise.items()}
                losses = autograd_step(model, (xs[s], ys[s], ids[s], noise), progress)
            epoch_loss += losses.detach()  # NaN and inf stick: checked once per epoch, no sync per step
            optimizer.step()
        scheduler.step()
        due = epoch % int(tr.eval_every) == 0 or epoch == int(tr.epochs)
        metrics = evaluator(model, R) if due else None
        if divergence.check(epoch, epoch_loss, metrics):
            break
        if metrics is not None:
            last_finite.evaluated()  # the weights these metrics come from
            saver.record(epoch, metrics)
            on_eval(epoch, metrics)
        if epoch < int(tr.epochs):
            saver.save(epoch)
    if orders is not None:
        orders.sync()  # the generators as the replicates' own randperm calls would have left them
    last_finite.restore()
    return divergence.diverged


def set_deterministic(on: bool, device: torch.device) -> None:
    """`trainer.deterministic`: deterministic torch algorithms (an error for an op without one),
    cuBLAS with a fixed workspace and deterministic cuDNN. CPU training is deterministic anyway."""
    if torch.are_deterministic_algorithms_enabled() != on:  # the call imports torch._inductor: seconds
        torch.use_deterministic_algorithms(on)
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


TORCH_THREADS = torch.get_num_threads()  # torch's default here (OMP_NUM_THREADS), before a run changes it
SMALL_STEP = 5e5  # multiply-adds of a step below which one thread is fastest


def auto_threads(model: torch.nn.Module, task, batch: int) -> int:
    """`trainer.threads: null`: one thread for a small model on vector inputs (its tiny ops run no
    faster on more threads, and on a busy machine the extra threads' waiting makes them many times
    slower), else torch's default. Small: all replicates' parameters times the rows of a step and
    its share of an evaluation of every row, under `SMALL_STEP`."""
    if not isinstance(task.x, torch.Tensor) or task.x.dim() != 2:  # images: convolutions work more than parameters say
        return TORCH_THREADS
    steps = -(-len(task.splits["train"]) // batch)
    work = sum(p.numel() for p in model.parameters()) * (batch + len(task.x) / steps)
    return 1 if work < SMALL_STEP else TORCH_THREADS


def build(cfg: DictConfig):
    """Task, routing, model, optimizer, scheduler and generators from the config.

    Objects are built as partials and then called, so that a ConfigError raised by a
    constructor reaches the user as itself, not wrapped by Hydra's instantiate.
    """
    tr = cfg.trainer
    validate(cfg)  # types, ranges and keys of the whole config, before anything is built
    device = resolve_device(str(tr.device))
    set_deterministic(bool(tr.get("deterministic", False)), device)
    if tr.get("threads"):
        torch.set_num_threads(int(tr.threads))
    seeds = [int(cfg.seed) + r for r in range(int(tr.replicates))]
    estimate = data_estimate(cfg.task, len(seeds))
    if estimate:
        key, value, rows, needed = estimate
        check_memory(f"a task of {rows:,} rows", key, value, needed, device)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    task = instantiate(cfg.task, _partial_=True)()
    allowed = "a callable returning a modnets.tasks.Task (docs/extending.md)"
    check(isinstance(task, Task), "task._target_", cfg.task._target_, allowed)
    routing = instantiate(cfg.router, _partial_=True)()
    build_model = instantiate(cfg.model, _partial_=True)
    check_model_memory(cfg, build_model, task, routing, len(seeds), device)
    model = build_model(task=task, routing=routing, generators=generators)
    allowed = "a callable returning an nn.Module with forward(x, task_id, noise) and routing_summary() (docs/extending.md)"
    check(isinstance(model, torch.nn.Module) and isinstance(model, Model), "model._target_", cfg.model._target_, allowed)
    model.to(device)
    task.to(device)
    if not tr.get("threads"):
        torch.set_num_threads(auto_threads(model, task, int(tr.batch_size)))
    optimizer = instantiate(cfg.optimizer)(parameter_groups(model, routing, float(cfg.optimizer.lr)))
    scheduler = ExponentialLR(optimizer, gamma=float(tr.lr_gamma))  # torch's, without importing torch._dynamo
    return SimpleNamespace(
        task=task, routing=routing, model=model, optimizer=optimizer, scheduler=scheduler,
        generators=generators, seeds=seeds, device=device,
    )


def open_runs(cfg: DictConfig, b: SimpleNamespace, logger) -> SimpleNamespace:
    """The output folder of each replicate, its resolved config and its W&B run (one per replicate)."""
    task, model, seeds = b.task, b.model, b.seeds
    out = Path(cfg.output_dir)
    dirs = output_dirs(out, seeds)
    group = f"{out.parent.name}/{out.name}" if len(seeds) > 1 else None
    group = str(HydraConfig.get().sweep.dir) if in_sweep() else group  # the runs of one sweep share a group
    configs = replicate_configs(cfg, range(len(seeds)))
    name = f"{task.name}-{type(model).__name__.lower()}"
    tags = [task.name, type(model).__name__.lower(), *(["sweep"] if in_sweep() else [])]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    shown = [c | {"arch": arch_label(c), "task_name": task.name} for c in configs]  # W&B only: keys to group runs by
    runs = [logger.start(c, f"{name}-s{s}", str(d), group, tags) for c, s, d in zip(shown, seeds, dirs)]
    logs = SimpleNamespace(dirs=dirs, configs=configs, runs=runs, max_points=logger.max_points, group=logger.group or group)
    logs.logger = logger
    logs.wandb = (logger, name, logs.group)  # the selected run's W&B run (modnets.selection)
    logs.pictures = draw.Pictures(logger.pictures, model, task, logs, limit=logger.max_pictures)
    return logs


class Recorder:
    """What happens at each evaluation: every replicate's history and W&B metrics, structure
    recovery about ten times per run (and the circuit picture at every other one of them), and a
    progress line about every tenth of training.

    The metrics stay on the device until something needs them on the host (a progress line, W&B);
    `histories` are built once, after training, from all evaluations at once. The W&B points
    (every `log_every` epochs, and the recovery metrics) are sent in chunks, every replicate's in
    one transfer from the device and one message per run: at each recovery checkpoint, after
    `FLUSH_S` seconds without one (live charts), and at the end; the steps are the epochs."""

    FLUSH_S = 5.0

    def __init__(self, cfg: DictConfig, b: SimpleNamespace, evaluator: Evaluator, logs: SimpleNamespace):
        tr = cfg.trainer
        self.model, self.task, self.evaluator, self.runs, self.pictures = b.model, b.task, evaluator, logs.runs, logs.pictures
        self.epochs, self.progress = int(tr.epochs), bool(tr.progress)
        self.logging = any(run.id is not None for run in logs.runs)  # W&B is on
        n_evals = int(tr.epochs) // int(tr.eval_every)
        self.every = max(1, n_evals // 10) * int(tr.eval_every)
        self.log_every = max(1, math.ceil(n_evals / max(1, logs.max_points))) * int(tr.eval_every)
        self.evals: list[tuple[int, torch.Tensor]] = []  # (epoch, metrics [R, splits, 3] on the device)
        self.unsent: list[tuple] = []  # W&B points not sent yet: (epoch, metrics or None, recovery or None, time)
        self.sent_at = time.monotonic()
        self._histories = None
        self.recovery_init = recovery.measure(b.model, b.task)  # the untrained model, a baseline
        self.recovery_history = [[] for _ in b.seeds] if self.recovery_init is not None else None
        self.last_recovery = (None, None)  # (epoch, recovery of every replicate) of the latest measurement
        self.epoch = 0

    def __call__(self, epoch: int, metrics: torch.Tensor) -> None:
        self.evals.append((epoch, metrics))
        last, self.epoch = epoch == self.epochs, epoch
        checkpoint = epoch % self.every == 0 or last
        measured = None
        if self.recovery_history is not None and checkpoint:
            self.last_recovery = (epoch, measured := recovery.measure(self.model, self.task))
            for h, rec in zip(self.recovery_history, measured):
                h.append({"epoch": epoch, **rec})
        if self.logging:
            logged = metrics if epoch % self.log_every == 0 or last else None
            if logged is not None or measured is not None:
                self.unsent.append((epoch, logged, measured, time.time()))
            if checkpoint or time.monotonic() - self.sent_at > self.FLUSH_S:
                self.send()
        if epoch % (2 * self.every) == 0 and not last:  # every other recovery checkpoint; the last one with the results
            self.pictures.checkpoint(self.model, self.task, epoch)
        if self.progress and checkpoint:
            print(progress_line(epoch, self.epochs, self.evaluator.as_dicts(metrics)), flush=True)

    def send(self) -> None:
        """Log the W&B points not sent yet: one row per epoch and run, its metrics and recovery."""
        unsent, self.unsent, self.sent_at = self.unsent, [], time.monotonic()
        if not unsent:
            return
        logged = [m for _, m, _, _ in unsent if m is not None]
        values = iter(torch.stack(logged).cpu().tolist() if logged else [])  # [epochs, R, splits, 3]: one transfer
        rows = [[] for _ in self.runs]
        for epoch, metrics, measured, at in unsent:
            v = next(values) if metrics is not None else None
            for r, run_rows in enumerate(rows):  # _timestamp: W&B's time axis is when it was evaluated, not sent
                row = {"epoch": epoch, "_timestamp": at}
                if v is not None:
                    row |= dict(zip(self.evaluator.keys, chain.from_iterable(v[r])))
                if measured is not None:
                    row |= {f"recovery/{k}": x for k, x in measured[r].items() if k != "input_routing_layers"}
                run_rows.append(row)
        for wandb_run, run_rows in zip(self.runs, rows):
            wandb_run.log_rows(run_rows)

    @property
    def histories(self) -> list[list[dict]]:
        """Per replicate, one {"epoch", split_metric: value} row per evaluation (built on first use:
        1024 replicates x 200 evaluations are 2.5 M values, built row by row in C with the cycle
        collector paused)."""
        if self._histories is None:
            self._histories = [[] for _ in self.runs]
            if self.evals:
                epochs = [e for e, _ in self.evals]
                values = torch.stack([m for _, m in self.evals]).flatten(2).transpose(0, 1)  # [R, evals, splits * 3]
                keys, with_epoch = repeat(("epoch", *self.evaluator.keys)), lambda e, v: (e, *v)
                with paused_gc():
                    rows = values.cpu().numpy().tolist()  # one transfer; numpy's tolist: the same floats, faster
                    self._histories = [list(map(dict, map(zip, keys, map(with_epoch, epochs, r)))) for r in rows]
        return self._histories


def progress_line(epoch: int, epochs: int, rows: list[dict]) -> str:
    """One line of training progress: metrics of the replicates' mean."""
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    line = f"epoch {epoch:>5}/{epochs}  loss {mean['train_loss']:.4f}  acc train {mean['train_acc']:.3f}"
    line += f"  val {mean['val_acc']:.3f}  heldout {mean['heldout_acc']:.3f} (exact {mean['heldout_exact']:.3f})"
    return line + (f"  [mean of {len(rows)} replicates]" if len(rows) > 1 else "")


def write_results(
    cfg: DictConfig, b: SimpleNamespace, logs: SimpleNamespace, recorder: Recorder, diverged: dict[int, int], times: dict
) -> list[dict]:
    """One results.json per replicate (modnets.results has the contract), and the W&B summaries."""
    with paused_gc():  # millions of new objects that live until the end: nothing for the cycle collector to find
        results, recoveries = collect_results(cfg, b=b, logs=logs, recorder=recorder, diverged=diverged, times=times)
        return save_results(cfg, logs=logs, recorder=recorder, results=results, recoveries=recoveries, times=times)


def collect_results(
    cfg: DictConfig, b: SimpleNamespace, logs: SimpleNamespace, recorder: Recorder, diverged: dict[int, int], times: dict
) -> tuple[list[dict], list[dict] | None]:
    """Each replicate's results (without `timings_s`), and its recovery metrics for the W&B summary."""
    task, model, seeds = b.task, b.model, b.seeds
    params = count_parameters(model, len(seeds))
    flops = count_flops(model, task, len(seeds), int(cfg.trainer.epochs) * len(task.splits["train"]))
    routings = model.routing_summary()
    modules = draw.modules_json(model, task.circuits) or [None] * len(seeds)
    circuits = [draw.circuit_json(c) for c in task.circuits] if task.circuits else None
    epoch, measured = recorder.last_recovery  # measured after the last epoch: still the weights when none diverged
    if epoch != int(cfg.trainer.epochs) or diverged:  # (a diverged replicate's weights were put back since)
        measured = recovery.measure(model, task)
    recoveries = recovery.with_baselines(model, task, measured, recorder.recovery_init)
    majority = majority_baseline(task)
    gaps = recorder.evaluator.discretisation_gap(model, len(seeds))  # soft router methods only
    if recoveries is not None and gaps is not None:
        recoveries = [r | g for r, g in zip(recoveries, gaps)]
    commit = git_commit()
    results = []
    for r, (history, wandb_run) in enumerate(zip(recorder.histories, logs.runs)):
        if r in diverged:  # keep the evaluations before the epoch whose training loss was NaN or inf
            history[:] = [h for h in history if h["epoch"] < diverged[r]]
            if recorder.recovery_history is not None:
                recorder.recovery_history[r][:] = [h for h in recorder.recovery_history[r] if h["epoch"] < diverged[r]]
        best = best_entry(history) if history else None
        result = {
            "status": "diverged" if r in diverged else "completed",
            "diverged_epoch": diverged.get(r),
            "config": logs.configs[r],
            "replicate": {"index": r, "of": len(seeds), "base_seed": int(cfg.seed)},
            "history": history,
            "final": history[-1] if history else None,
            "best": best,
            "params": params,
            "flops": flops,
            "routing": routings[r],
            "circuits": circuits,
            "modules": modules[r],
            "recovery": recoveries and {**recoveries[r], "history": recorder.recovery_history[r]},
            "majority": majority,
            "config_hash": config_hash(logs.configs[r]),
            "train_time_s": times["train"] - times["open_runs"],
            "wall_time_s": time.time() - times["start"],
            "device": str(b.device),
            "modnets_version": modnets.__version__,
            "git_commit": commit,
            "wandb_id": wandb_run.id,
            "wandb_group": logs.group if wandb_run.id else None,  # the W&B group it logged to (aggregate.py --wandb)
        }
        results.append(result)
    return results, recoveries


def save_results(
    cfg: DictConfig, logs: SimpleNamespace, recorder: Recorder, results: list[dict], recoveries: list[dict] | None, times: dict
) -> list[dict]:
    """Write every results.json, its picture and its W&B summary. The files are written again once W&B
    has finished every run when W&B could not start one, so that each names its W&B run or null."""
    recorder.send()  # W&B points of the last epochs (when training stopped early)
    times["results"] = time.time()
    timings = phases(times)
    paths = [d / "results.json" for d in logs.dirs]
    written = write_jsons(paths, [result | {"timings_s": timings} for result in results])
    for path, e in zip(paths, written):
        if isinstance(e, OSError):  # a full disk: W&B runs are closed, the checkpoint stays for the relaunch
            for wandb_run in logs.runs:
                wandb_run.finish()
            raise RunError(f"could not write {path}: {e.strerror or one_line(e)}; {kept(cfg)}")
    for r, (d, result, wandb_run) in enumerate(zip(logs.dirs, written, logs.runs)):
        logs.pictures.finish(result, d, wandb_run, step=max(recorder.epoch, 1))
        history, best = result["history"], result["best"]
        summary = {f"final/{k}": v for k, v in (history[-1] if history else {}).items()}
        summary |= {f"best/{k}": v for k, v in (best or {}).items()}
        summary |= {f"recovery/{k}": v for k, v in (recoveries[r] if recoveries else {}).items() if isinstance(v, float)}
        wandb_run.finish(summary)
    started = logs.logger.settle() if hasattr(logs.logger, "settle") else None  # wait until W&B has finished every run
    for r, (d, result) in enumerate(zip(logs.dirs, written)):
        if started is not None and result["wandb_id"] not in started | {None}:  # W&B could not start it (rare): say so
            written[r] = write_json(d / "results.json", result | {"wandb_id": None, "wandb_group": None})
    return written


def phases(times: dict) -> dict[str, float]:
    """Seconds of each phase of a run so far, from the time stamps taken at the end of each."""
    names, stamps = list(times), list(times.values())
    return {name: round(b - a, 4) for name, a, b in zip(names[1:], stamps, stamps[1:])}


def majority_baseline(task) -> dict[str, float]:
    """Per split, the bit accuracy of always answering each output's most frequent training value
    (ties: 0): what a model that learned nothing but the output rates scores."""
    guess = (task.y[task.splits["train"]].mean(0) > 0.5).float()
    return {f"{name}_acc": float((task.y[rows] == guess).float().mean()) for name, rows in task.splits.items()}


def run_label(cfg: DictConfig) -> str:
    """What a run is, for its summary line: a sweep job's overrides, else the config group choices."""
    if not HydraConfig.initialized():
        return "run"
    hc = HydraConfig.get()
    if in_sweep() and hc.job.override_dirname:
        return hc.job.override_dirname
    choices = hc.runtime.choices
    groups = ("experiment", "arch", "task", "model", "router")
    return " ".join(f"{g}={choices[g]}" for g in groups if choices.get(g) not in (None, "null"))


def summary_line(results: list[dict], label: str, out: str) -> str:
    """One line at the end of a run: held-out accuracy over its seeds against the majority answer."""
    done = [r for r in results if r.get("final")]
    if not done:
        return f"modnets: {label}: no finished evaluation (see {out})"
    acc = torch.tensor([r["final"]["heldout_acc"] for r in done], dtype=torch.float64)
    exact = sum(r["final"]["heldout_exact"] for r in done) / len(done)
    spread = f" ± {acc.std().item():.3f}" if len(done) > 1 else ""
    seeds = f"{len(done)} seeds" if len(done) > 1 else f"seed {done[0]['config']['seed']}"
    line = f"modnets: {label}: held-out accuracy {acc.mean().item():.3f}{spread} (all bits right {exact:.3f}), {seeds}"
    majority = done[0].get("majority", {}).get("heldout_acc")
    return line + (f"; majority answer {majority:.3f}" if majority is not None else "") + f"  -> {out}"


def kept(cfg: DictConfig) -> str:
    """What a relaunch after a failed results write will do."""
    if (Path(cfg.output_dir) / CHECKPOINT).exists():
        return "the checkpoint is kept: free space and relaunch to resume"
    return "no checkpoint to resume from (trainer.checkpoint_every=N keeps one): free space and relaunch"


def run(cfg: DictConfig) -> list[dict]:
    """Build everything from the config, train, write one results.json per replicate (and, with
    `trainer.select`, `selected/results.json`: modnets.selection). The output folder is locked
    for the run's duration (a second process on it stops)."""
    start = time.time()
    validate(cfg)  # before anything reads the config (build validates again: it is also called alone)
    with lock_folder(Path(cfg.output_dir)):
        done = finished_results(cfg)
        if done is None:
            for line in sanity_warnings(cfg):
                warn(line)
            done = train(cfg, start)
            checkpoint.remove(cfg.output_dir)  # only now: the results are safely written
        else:  # a relaunched sweep: this job already ran with exactly this config
            print(f"modnets: skipped, {cfg.output_dir} holds finished results of this config", flush=True)
            selection.write_selected(cfg, done)  # selection reads only the results: cheap to redo
        clear_failure(Path(cfg.output_dir), int(cfg.trainer.replicates))
        return done


def train(cfg: DictConfig, start: float) -> list[dict]:
    """Build, train and write the results files (`run` without its folder bookkeeping). W&B starts
    first, in its own process, so that it imports itself while this one builds and trains."""
    logger = instantiate(cfg.logger)
    if hasattr(logger, "launch"):
        logger.launch()
    times = {"start": start, "wandb_launch": time.time()}  # time stamps at the end of each phase: timings_s
    try:
        b = build(cfg)
        evaluator = Evaluator(b.task, int(cfg.trainer.eval_batch_size))
        times["build"] = time.time()
        logs = open_runs(cfg, b, logger)
        recorder = Recorder(cfg, b, evaluator, logs)
        times["open_runs"] = time.time()
        extra = {"recovery_history": recorder.recovery_history}  # state on_eval computes from the model: checkpointed as is
        diverged = fit(
            cfg, task=b.task, model=b.model, optimizer=b.optimizer, scheduler=b.scheduler, generators=b.generators,
            evaluator=evaluator, on_eval=recorder, extra_state=extra,
        )
        times["train"] = time.time()
        results = write_results(cfg, b=b, logs=logs, recorder=recorder, diverged=diverged, times=times)
        selection.write_selected(cfg, results, wandb=logs.wandb)
        return results
    finally:
        if hasattr(logger, "close"):
            logger.close()  # after an error too: the W&B worker finishes its runs and exits (a no-op when done)


def failed(cfg: DictConfig, e: Exception) -> None:
    """A run that raised. In a sweep: recorded as a `failed` results file (or, when even that
    fails, reported on stderr), and the sweep goes on. Alone: one line and exit code 2 (config)
    or 1 (a file, a folder, a disk); anything else is a bug and keeps its traceback."""
    if isinstance(e, FolderBusy):  # its folder and results belong to the other process
        print(f"modnets: error: {e}", file=sys.stderr, flush=True)
        if in_sweep():
            return None
        raise SystemExit(1) from None
    if in_sweep():
        record_failure(cfg, e)
        return None
    if isinstance(e, ConfigError):
        print(f"modnets: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if isinstance(e, (RunError, OSError)):
        print(f"modnets: error: {os_problem(e) if isinstance(e, OSError) else e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    raise e


@one_line_errors  # Hydra's errors (unknown key, missing option) as one line, like ConfigError
@compose_once  # a single run's config composed once (Hydra composes it twice)
@hydra.main(version_base="1.3", config_path=str(modnets.CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    RUNS.append(in_sweep())
    try:
        results = run(cfg)
    except Exception as e:
        return failed(cfg, e)
    out = Path(cfg.output_dir)
    out = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    print(summary_line(results, run_label(cfg), str(out)), flush=True)
    finals = [r["final"]["heldout_acc"] for r in results if r.get("final")]  # diverged runs may have none
    return sum(finals) / len(finals) if finals else float("nan")

