"""Routers: which inputs each module reads, and which library module each slot uses (spec §3).

Every router holds logits with a leading replicate dimension and a task dimension,
`[R, tasks, choices, consumers]`. The forward value is always a hard one-hot selection;
in training, gradients reach the logits through the straight-through estimator
`hard - s.detach() + s`. Known routers are fixed (no gradient, no noise, not in the optimizer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """The `router` config group: how modular models choose their wiring."""

    topk: int = 2  # module arity: inputs each module reads
    tau: float = 1.0  # temperature of the selection scores in training
    gumbel: bool = False  # add Gumbel noise to the logits in training
    per_sample: bool = False  # draw the noise (and the task's router row) per sample, not per batch
    known_inputs: bool = False  # input routers fixed to the task's ground truth
    known_outputs: bool = False  # output router fixed to the task's output selection
    known_locations: bool = False  # shared models: slot -> module fixed to the ground truth
    lr: float = 0.1  # learning rate of input and output routers
    location_lr: float = 0.1  # learning rate of location routers

    @property
    def known(self) -> bool:
        return self.known_inputs or self.known_outputs or self.known_locations


def _pick_rows(logits: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
    """[R, T, ...] -> [R, B, ...] (the row of each sample's task, task_id [R, B]),
    or [R, 1, ...] when there is one task."""
    if logits.shape[1] == 1:
        return logits
    return logits[torch.arange(len(logits), device=logits.device)[:, None], task_id]


class InputRouter(nn.Module):
    """Each of `consumers` picks `k` of `width` inputs; the j-th pick feeds its input j."""

    def __init__(self, logits: torch.Tensor, k: int, tau: float, gumbel: bool, fixed: bool):
        super().__init__()
        self.logits = nn.Parameter(logits, requires_grad=not fixed)  # [R, T, width, consumers]
        self.k, self.tau = k, tau
        self.noisy = gumbel and not fixed

    def forward(self, h: torch.Tensor, task_id: torch.Tensor, noise: torch.Tensor | None = None):
        """h [R, B, width] -> the selected inputs [R, B, consumers, k]."""
        logits = _pick_rows(self.logits, task_id)
        if self.training and noise is not None:
            logits = logits + noise
        idx = logits.topk(self.k, dim=2).indices  # [R, B|1, k, consumers]
        mask = torch.zeros(*logits.shape[:3], self.k, logits.shape[3], device=h.device)
        mask.scatter_(2, idx.unsqueeze(2), 1.0)  # [R, B|1, width, k, consumers]
        if self.training and self.logits.requires_grad:
            s = torch.sigmoid(logits / self.tau)
            mask = mask + (s - s.detach()).unsqueeze(3)
        if mask.shape[1] == 1:  # one selection for the whole batch: a batched matmul
            R, _, W, k, n = mask.shape
            return torch.bmm(h, mask.view(R, W, k * n)).view(R, -1, k, n).transpose(2, 3)
        return torch.einsum("rbw,rbwkn->rbnk", h, mask)

    def selection(self) -> torch.Tensor:
        """The noise-free choice [R, T, consumers, k] (input indices), as evaluation uses it."""
        return self.logits.detach().topk(self.k, dim=2).indices.transpose(2, 3)


class LocationRouter(nn.Module):
    """Each of `slots` picks one module of a shared library: logits [R, T, library, slots]."""

    def __init__(self, logits: torch.Tensor, tau: float, gumbel: bool, fixed: bool):
        super().__init__()
        self.logits = nn.Parameter(logits, requires_grad=not fixed)
        self.tau = tau
        self.noisy = gumbel and not fixed

    def forward(self, task_id: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Module scores [R, B|1, library, slots]: one-hot in value, softmax gradients in training."""
        logits = _pick_rows(self.logits, task_id)
        if self.training and noise is not None:
            logits = logits + noise
        hard = torch.zeros_like(logits).scatter_(2, logits.argmax(2, keepdim=True), 1.0)
        if self.training and self.logits.requires_grad:
            s = torch.softmax(logits / self.tau, dim=2)
            hard = hard + s - s.detach()
        return hard

    def selection(self) -> torch.Tensor:
        """The noise-free choice [R, T, slots] (library module of each slot)."""
        return self.logits.detach().argmax(2)


def noise_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Per noisy router of a model (by module name), the shape of one noise draw: its logits'
    shape without the replicate and task dimensions. Empty for a model without noisy routers."""
    return {
        name: tuple(m.logits.shape[2:])
        for name, m in model.named_modules()
        if isinstance(m, (InputRouter, LocationRouter)) and m.noisy
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
