"""Routers as a family of methods: which inputs each module reads, which library module each slot uses.

The `router` config group builds one *router method* (a `Router` subclass; its fields are the
group's keys). A model never names a concrete router class: it asks the method for its selectors,

    method.input_router(generators, shape=(T, width, consumers), k=k, truth=None, sets=False)
    method.location_router(generators, shape=(T, library, slots), truth=None)

and the trainer only calls the method's hooks (`schedule`, `loss`, `soft`). Known routing is part
of the same family: given `truth`, every method returns a fixed top-k / argmax selector (the
original's known-routing logits, no gradient, no noise, left out of the optimizer).

Contract of a method (subclass `Router`, a dataclass; add one YAML in conf/router/ with `_target_`):
- `input_router(...)` -> an `InputRouter` module: `consumers` consumers each pick `k` of `width`
  inputs (the j-th pick feeds input j). `sets=True` when the consumers are modules the model may
  evaluate on several candidate input sets (see `Routed`); output and image routers pass False.
- `location_router(...)` -> a `LocationRouter` module: each of `slots` slots picks one of `library`.
- Draw initial logits from each replicate's generator (`draw_logits`), in the order the model
  asks: replicate r of a batched model must equal the single run of seed + r.
- `schedule(model, progress)`: called before every epoch, progress 0 (first) .. 1 (last): sets
  temperatures (`tau` -> `tau_end`, shape `anneal`).
- `loss(model, per_output, progress)` -> [R] tensor added to each replicate's training loss, or
  None (per_output: the step's BCE [R, B, outputs], not reduced). The base adds the regularisers
  (`entropy`, `duplicate`); score-function methods add their surrogate here.
- `soft` (class attribute): True when the training forward pass is not a hard selection; the
  trainer then reports the discretisation gap (training-mode minus hard accuracy).

Contract of a selector module (`InputRouter` / `LocationRouter`):
- `logits`: a Parameter [R, T, choices, consumers], R replicates, T tasks (the task's row is
  picked per sample by task id when T > 1); trainable unless fixed.
- `forward` in training mode may be soft or sampled, in eval mode it is always the hard,
  noise-free `selection()`; `selection()` returns indices ([R, T, consumers, k] input indices,
  [R, T, slots] library modules).
- `noise_shape`: the shape of one Gumbel(0, 1) draw (without R and T), or None: the trainer draws
  it from the replicate's generator, per sample or per step (`per_sample`), and passes it in.
- `probs()`: the selector's distribution over its choices [R, T, choices, consumers] (regularisers).
- `tau`: the current temperature (set by `schedule`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn


class Routed(NamedTuple):
    """What an input router hands its consumers: candidate inputs x [R, B, C, consumers, k] and
    candidate weights [R, B|1, C, consumers] (None when C = 1: one hard or soft-mixed input set).
    A model evaluates each consumer on every candidate and sums the outputs with the weights."""

    x: torch.Tensor
    weights: torch.Tensor | None


def pick_rows(logits: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
    """[R, T, ...] -> [R, B, ...] (the row of each sample's task, task_id [R, B]),
    or [R, 1, ...] when there is one task."""
    if logits.shape[1] == 1:
        return logits
    return logits[torch.arange(len(logits), device=logits.device)[:, None], task_id]


def topk_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """One-hot masks [R, B, width, k, consumers] of the top-k choices of logits [R, B, width, consumers]."""
    idx = logits.topk(k, dim=2).indices  # [R, B|1, k, consumers]
    mask = torch.zeros(*logits.shape[:3], k, logits.shape[3], device=logits.device)
    return mask.scatter_(2, idx.unsqueeze(2), 1.0)


def apply_mask(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h [R, B, width], mask [R, B|1, width, k, consumers] -> the selected inputs [R, B, consumers, k]."""
    if mask.shape[1] == 1:  # one selection for the whole batch: a batched matmul
        R, _, W, k, n = mask.shape
        return torch.bmm(h, mask.view(R, W, k * n)).view(R, -1, k, n).transpose(2, 3)
    return torch.einsum("rbw,rbwkn->rbnk", h, mask)


def _gather(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """h [R, B, width], idx [R, B|1, n, k] -> h at those indices [R, B, n, k]."""
    R, B, W = h.shape
    n, k = idx.shape[2:]
    idx = idx.expand(R, B, n, k).reshape(R, B, n * k)
    return h.gather(2, idx).view(R, B, n, k)


class InputRouter(nn.Module):
    """Base of input selectors: `consumers` consumers each pick `k` of `width` inputs."""

    noisy = False

    def __init__(self, logits: torch.Tensor, k: int, width: int, consumers: int, tau: float, fixed: bool, sets: bool):
        super().__init__()
        self.logits = nn.Parameter(logits, requires_grad=not fixed)  # [R, T, choices, consumers']
        self.k, self.width, self.consumers, self.tau, self.sets = k, width, consumers, tau, sets

    @property
    def noise_shape(self) -> tuple[int, ...] | None:
        return tuple(self.logits.shape[2:]) if self.noisy and self.logits.requires_grad else None

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits / self.tau, dim=2)

    def selection(self) -> torch.Tensor:
        """The noise-free choice [R, T, consumers, k] (input indices), as evaluation uses it."""
        return self.logits.detach().topk(self.k, dim=2).indices.transpose(2, 3)


class TopKRouter(InputRouter):
    """The original router (spec §3): hard top-k in value; in training, gradients through the
    straight-through estimator `hard - s.detach() + s` with s = sigmoid(logits / tau); with
    `noisy`, Gumbel noise is added to the logits first. Fixed (known) routers: hard only."""

    def __init__(self, logits, k, width, consumers, tau, fixed, sets, noisy=False):
        super().__init__(logits, k, width, consumers, tau, fixed, sets)
        self.noisy = noisy and not fixed

    def forward(self, h: torch.Tensor, task_id: torch.Tensor, noise: torch.Tensor | None = None) -> Routed:
        logits = pick_rows(self.logits, task_id)
        if self.training and noise is not None:
            logits = logits + noise
        mask = topk_mask(logits, self.k)
        if self.training and self.logits.requires_grad:
            s = torch.sigmoid(logits / self.tau)
            mask = mask + (s - s.detach()).unsqueeze(3)
        return Routed(apply_mask(h, mask).unsqueeze(2), None)


class SoftSetRouter(InputRouter):
    """Marginal routing over candidate sets: logits [R, T, C, consumers] over all C = C(width, k)
    unordered input sets; in training every set feeds the consumer and the outputs are mixed by
    softmax(logits / tau); in evaluation only the argmax set (hard)."""

    def __init__(self, logits, k, width, consumers, tau, fixed, sets):
        super().__init__(logits, k, width, consumers, tau, fixed, sets)
        self.register_buffer("candidates", torch.tensor(list(itertools.combinations(range(width), k))))  # [C, k]

    def forward(self, h, task_id, noise=None) -> Routed:
        logits = pick_rows(self.logits, task_id)  # [R, B|1, C, n]
        if not self.training:
            return Routed(_gather(h, self.candidates[logits.argmax(2)]).unsqueeze(2), None)
        x = h[:, :, self.candidates]  # [R, B, C, k]
        x = x.unsqueeze(3).expand(-1, -1, -1, self.consumers, -1)
        return Routed(x, torch.softmax(logits / self.tau, dim=2))

    def selection(self) -> torch.Tensor:
        return self.candidates[self.logits.detach().argmax(2)]


class SoftInputRouter(InputRouter):
    """Per-input softmax: each of the k inputs of each consumer is softmax(logits / tau)-weighted
    sum of the width inputs in training (logits [R, T, width, consumers * k]); argmax in evaluation.
    Used for ordered picks (outputs) and where candidate sets are too many."""

    def forward(self, h, task_id, noise=None) -> Routed:
        logits = pick_rows(self.logits, task_id)  # [R, B|1, W, n * k]
        R, B = h.shape[:2]
        if not self.training:
            idx = logits.argmax(2).view(R, -1, self.consumers, self.k)
            return Routed(_gather(h, idx).unsqueeze(2), None)
        p = torch.softmax(logits / self.tau, dim=2)
        if p.shape[1] == 1:
            x = torch.bmm(h, p[:, 0])
        else:
            x = torch.einsum("rbw,rbwm->rbm", h, p)
        return Routed(x.view(R, B, 1, self.consumers, self.k), None)

    def selection(self) -> torch.Tensor:
        R, T = self.logits.shape[:2]
        return self.logits.detach().argmax(2).view(R, T, self.consumers, self.k)


class SampledTopKRouter(InputRouter):
    """Score-function routing: in training the k inputs are a Gumbel-top-k sample from
    softmax(logits / tau) (k draws without replacement), used hard; `log_prob` [R, B|1] keeps the
    sample's Plackett-Luce log-probability for the method's surrogate loss."""

    noisy = True

    def forward(self, h, task_id, noise=None) -> Routed:
        scores = pick_rows(self.logits, task_id) / self.tau  # [R, B|1, W, n]
        self.log_prob = None
        if not (self.training and noise is not None):
            return Routed(apply_mask(h, topk_mask(scores.detach(), self.k)).unsqueeze(2), None)
        scores = scores.expand(-1, noise.shape[1], -1, -1)  # one routing per noise draw
        idx = (scores.detach() + noise).topk(self.k, dim=2).indices  # [R, B|1, k, n]
        taken = torch.zeros_like(scores, dtype=torch.bool)
        log_prob = 0.0
        for j in range(self.k):  # Plackett-Luce: the j-th pick among the ones not yet taken
            rest = scores.masked_fill(taken, float("-inf"))
            log_prob = log_prob + scores.gather(2, idx[:, :, j : j + 1]).squeeze(2) - rest.logsumexp(2)
            taken = taken.scatter(2, idx[:, :, j : j + 1], True)
        self.log_prob = log_prob.sum(-1)  # [R, B|1]
        mask = torch.zeros(*scores.shape[:3], self.k, scores.shape[3], device=h.device)
        return Routed(apply_mask(h, mask.scatter_(2, idx.unsqueeze(2), 1.0)).unsqueeze(2), None)


class LocationRouter(nn.Module):
    """Base of location selectors: each of `slots` slots picks one module of a shared library;
    forward returns module scores [R, B|1, library, slots] (one-hot in evaluation)."""

    noisy = False

    def __init__(self, logits: torch.Tensor, tau: float, fixed: bool):
        super().__init__()
        self.logits = nn.Parameter(logits, requires_grad=not fixed)  # [R, T, library, slots]
        self.tau = tau

    noise_shape = InputRouter.noise_shape
    probs = InputRouter.probs

    def hard(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(logits).scatter_(2, logits.argmax(2, keepdim=True), 1.0)

    def selection(self) -> torch.Tensor:
        """The noise-free choice [R, T, slots] (library module of each slot)."""
        return self.logits.detach().argmax(2)


class ArgmaxLocationRouter(LocationRouter):
    """The original location router: hard argmax in value, softmax(logits / tau) straight-through
    gradients in training, optional Gumbel noise."""

    def __init__(self, logits, tau, fixed, noisy=False):
        super().__init__(logits, tau, fixed)
        self.noisy = noisy and not fixed

    def forward(self, task_id: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        logits = pick_rows(self.logits, task_id)
        if self.training and noise is not None:
            logits = logits + noise
        hard = self.hard(logits)
        if self.training and self.logits.requires_grad:
            s = torch.softmax(logits / self.tau, dim=2)
            hard = hard + s - s.detach()
        return hard


class SoftLocationRouter(LocationRouter):
    """Every library module on every slot, mixed by softmax(logits / tau) in training; argmax in evaluation."""

    def forward(self, task_id, noise=None):
        logits = pick_rows(self.logits, task_id)
        return torch.softmax(logits / self.tau, dim=2) if self.training else self.hard(logits)


class SampledLocationRouter(LocationRouter):
    """A library module sampled from softmax(logits / tau) (Gumbel-max) in training, used hard;
    `log_prob` [R, B|1] for the surrogate loss."""

    noisy = True

    def forward(self, task_id, noise=None):
        scores = pick_rows(self.logits, task_id) / self.tau
        self.log_prob = None
        if not (self.training and noise is not None):
            return self.hard(scores)
        hard = self.hard(scores.detach() + noise)
        self.log_prob = (torch.log_softmax(scores, dim=2) * hard).sum((2, 3))
        return hard


def selectors(model: nn.Module, trainable: bool = True) -> list[nn.Module]:
    """The model's input and location selectors (only trainable ones by default)."""
    return [
        m for m in model.modules()
        if isinstance(m, (InputRouter, LocationRouter)) and (m.logits.requires_grad or not trainable)
    ]


def anneal(start: float, end: float | None, progress: float, shape: str) -> float:
    """A value going from `start` (progress 0) to `end` (progress 1): exponential (geometric),
    linear or cosine; constant when end is None."""
    if end is None:
        return start
    if shape == "exponential":
        return start * (end / start) ** progress
    if shape == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2
    return start + (end - start) * progress


@dataclass
class Router:
    """Base router method (see the module docstring for the contract). Known routing: with
    `known_inputs` / `known_outputs` / `known_locations` the model passes the task's truth and
    gets fixed selectors whatever the method. Regularisers for any learned method: `entropy` (a
    bonus weight on the selectors' entropy, annealed linearly to 0 over training) and `duplicate`
    (a penalty weight on two consumers of an input router choosing the same: two modules of a
    layer the same input set, two output bits the same module; the overlap of their choice
    distributions, see `overlap`)."""

    topk: int = 2  # module arity: inputs each module reads
    tau: float = 1.0  # temperature of the selection scores in training (start of the schedule)
    tau_end: float | None = None  # temperature at the last epoch; null: constant tau
    anneal: str = "exponential"  # shape of the schedule: exponential, linear or cosine
    gumbel: bool = False  # add Gumbel noise to the logits in training
    per_sample: bool = False  # draw the noise (and the task's router row) per sample, not per batch
    known_inputs: bool = False  # input routers fixed to the task's ground truth
    known_outputs: bool = False  # output router fixed to the task's output selection
    known_locations: bool = False  # shared models: slot -> module fixed to the ground truth
    lr: float = 0.1  # learning rate of input and output routers
    location_lr: float = 0.1  # learning rate of location routers
    entropy: float = 0.0  # entropy bonus weight at the first epoch, annealed linearly to 0
    duplicate: float = 0.0  # penalty weight on two modules of a layer choosing the same inputs

    soft = False  # training forward is a hard selection

    @property
    def known(self) -> bool:
        return self.known_inputs or self.known_outputs or self.known_locations

    def draw_logits(self, generators, shape) -> torch.Tensor:
        """N(0, 1) logits [R, *shape], one draw per replicate generator."""
        return torch.stack([torch.randn(shape, generator=g) for g in generators])

    def input_router(self, generators, shape, k: int, truth=None, sets: bool = False) -> InputRouter:
        """The selector of `consumers` consumers picking k of `width` (shape = (T, width, consumers))."""
        logits = self.draw_logits(generators, shape)
        if truth is not None:
            return self.known_input_router(logits, k, truth, sets)
        return self.learned_input_router(logits, k, shape, sets)

    def known_input_router(self, logits, k, truth, sets) -> InputRouter:
        R, (T, W, n) = len(logits), logits.shape[1:]
        fixed = known_input_logits((T, W, n), truth).expand(R, -1, -1, -1).clone()
        return TopKRouter(fixed, k, W, n, self.tau, fixed=True, sets=sets)

    def learned_input_router(self, logits, k, shape, sets) -> InputRouter:
        _, width, n = shape
        return TopKRouter(logits, k, width, n, self.tau, fixed=False, sets=sets, noisy=self.gumbel)

    def location_router(self, generators, shape, truth=None) -> LocationRouter:
        logits = self.draw_logits(generators, shape)
        if truth is not None:
            fixed = known_location_logits(shape, truth).expand(len(logits), -1, -1, -1).clone()
            return ArgmaxLocationRouter(fixed, self.tau, fixed=True)
        return self.learned_location_router(logits)

    def learned_location_router(self, logits) -> LocationRouter:
        return ArgmaxLocationRouter(logits, self.tau, fixed=False, noisy=self.gumbel)

    def schedule(self, model: nn.Module, progress: float) -> None:
        if self.tau_end is not None:
            tau = anneal(self.tau, self.tau_end, progress, self.anneal)
            for m in selectors(model):
                m.tau = tau

    def loss(self, model: nn.Module, per_output: torch.Tensor, progress: float) -> torch.Tensor | None:
        """Regularisers [R] (None when both weights are 0: the loss is then exactly the task's)."""
        total = None
        weight = self.entropy * (1 - progress)
        if weight > 0:
            total = -weight * sum(entropy(m.probs()) for m in selectors(model))
        if self.duplicate > 0:
            dup = sum(overlap(m.probs()) for m in selectors(model) if isinstance(m, InputRouter))
            total = self.duplicate * dup if total is None else total + self.duplicate * dup
        return total


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean entropy per consumer of choice distributions p [R, T, choices, consumers] -> [R]."""
    return -(p * p.clamp_min(1e-12).log()).sum(2).mean((1, 2))


def overlap(p: torch.Tensor) -> torch.Tensor:
    """Mean probability that two different consumers of p [R, T, choices, consumers] make the
    same choice (independent draws) -> [R]; 0 with one consumer."""
    n = p.shape[3]
    if n < 2:
        return p.new_zeros(p.shape[0])
    gram = torch.einsum("rtcn,rtcm->rtnm", p, p)
    off = gram.sum((2, 3)) - gram.diagonal(dim1=2, dim2=3).sum(2)
    return (off / (n * (n - 1))).mean(1)


@dataclass
class Learned(Router):
    """The original router (Patil et al.'s hierarchically modular networks): top-k selection with
    straight-through sigmoid gradients (Bengio, Léonard & Courville, 2013); `gumbel: true` adds
    Gumbel noise to the logits in training."""


@dataclass
class Gumbel(Learned):
    """Gumbel-perturbed top-k with straight-through gradients (Jang, Gu & Poole, ICLR 2017; Maddison,
    Mnih & Teh, ICLR 2017), with a temperature schedule `tau` -> `tau_end` (shape `anneal`)."""

    gumbel: bool = True
    per_sample: bool = True


@dataclass
class Soft(Router):
    """Soft / marginal routing: in training each module is evaluated on every candidate input set
    (all C(width, k) sets while there are at most `max_sets`, otherwise a softmax per input) and
    its outputs are mixed by softmax(logits / tau); tau anneals to `tau_end`, so training ends
    nearly hard; evaluation is always hard (the argmax set). Location routers mix all library
    modules. Continuous relaxation in the spirit of DARTS (Liu, Simonyan & Yang, ICLR 2019)."""

    tau: float = 1.0
    tau_end: float | None = 0.02
    lr: float = 0.05
    max_sets: int = 64  # most candidate sets per module before falling back to a softmax per input
    init_scale: float = 1.0  # initial logits N(0, init_scale^2): 0 starts from uniform mixtures

    soft = True

    def draw_logits(self, generators, shape) -> torch.Tensor:
        return super().draw_logits(generators, shape) * self.init_scale

    def input_router(self, generators, shape, k: int, truth=None, sets: bool = False) -> InputRouter:
        T, width, n = shape
        if truth is not None:
            return super().input_router(generators, shape, k, truth, sets)
        if sets and math.comb(width, k) <= self.max_sets:  # one logit per candidate set
            logits = self.draw_logits(generators, (T, math.comb(width, k), n))
            return SoftSetRouter(logits, k, width, n, self.tau, fixed=False, sets=sets)
        logits = self.draw_logits(generators, (T, width, n * k))  # input j of consumer c at c * k + j
        return SoftInputRouter(logits, k, width, n, self.tau, fixed=False, sets=sets)

    def learned_location_router(self, logits) -> LocationRouter:
        return SoftLocationRouter(logits, self.tau, fixed=False)


@dataclass
class Sampling(Router):
    """Score-function routing (REINFORCE, Williams, Machine Learning 1992): in training each
    sample's routing is drawn from softmax(logits / tau) (Gumbel-top-k: Kool, van Hoof & Welling,
    ICML 2019) and used hard; the router logits follow the gradient of
    E[loss] = E[(loss - baseline) * log p(routing)], with the leave-one-out mean of the batch's
    other samples as baseline (Kool, van Hoof & Welling, "Buy 4 REINFORCE samples, get a baseline
    for free!", ICLR 2019 workshop). Modules train on the sampled routing as in the hard forward."""

    per_sample: bool = True
    lr: float = 0.05

    def learned_input_router(self, logits, k, shape, sets) -> InputRouter:
        _, width, n = shape
        return SampledTopKRouter(logits, k, width, n, self.tau, fixed=False, sets=sets)

    def learned_location_router(self, logits) -> LocationRouter:
        return SampledLocationRouter(logits, self.tau, fixed=False)

    def loss(self, model, per_output, progress):
        total = super().loss(model, per_output, progress)
        log_probs = [m.log_prob for m in selectors(model) if getattr(m, "log_prob", None) is not None]
        if not log_probs:
            return total
        log_prob = sum(log_probs)  # [R, B|1]: independent routers, one joint routing per sample
        cost = per_output.detach().mean(2)  # [R, B]
        B = cost.shape[1]
        if log_prob.shape[1] > 1 and B > 1:  # a routing per sample: leave-one-out baseline
            advantage = cost - (cost.sum(1, keepdim=True) - cost) / (B - 1)
        else:  # one routing per step: a moving average of each replicate's past losses
            cost = cost.mean(1, keepdim=True)
            baseline = getattr(self, "_baseline", None)
            baseline = cost if baseline is None or baseline.shape != cost.shape else baseline
            advantage, self._baseline = cost - baseline, 0.9 * baseline + 0.1 * cost
        surrogate = (advantage * log_prob).mean(1)
        return surrogate if total is None else total + surrogate


def noise_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Per noisy selector of a model (by module name), the shape of one Gumbel(0, 1) draw: its
    logits' shape without the replicate and task dimensions. Empty without noisy selectors."""
    return {
        name: m.noise_shape
        for name, m in model.named_modules()
        if isinstance(m, (InputRouter, LocationRouter)) and m.noise_shape is not None
    }


def known_input_logits(shape, choices: list[list[list[int]]]) -> torch.Tensor:
    """Logits [T, width, consumers] that select `choices[t][consumer]` in order (spec §3):
    1.1 at the first true input, then 1.0 (k = 2) or 1.1 - j/1000 (any k), 0 elsewhere."""
    logits = torch.zeros(shape)
    for t, per_task in enumerate(choices):
        for c, inputs in enumerate(per_task):
            k = len(inputs)
            for j, i in enumerate(inputs):
                logits[t, i, c] = 1.1 - j * (0.1 if k == 2 else 1e-3)
    return logits


def known_location_logits(shape, slots: list[list[int]]) -> torch.Tensor:
    """Logits [T, library, slots]: 1.0 at each slot's true module, 0 elsewhere."""
    logits = torch.zeros(shape)
    for t, per_task in enumerate(slots):
        for s, module in enumerate(per_task):
            logits[t, module, s] = 1.0
    return logits
