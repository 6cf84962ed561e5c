"""Adam over one flat buffer, and the learning-rate decay that goes with any optimizer.

Why not `torch.optim.Adam`: its first `add_param_group` and every `step` import the
compiler stack (`torch._dynamo`, about a second of start-up), and a step walks the
parameter groups and their state in Python. Here every trainable parameter, gradient and
moment is a view into one flat tensor each; a step is one call of torch's fused Adam
kernel (`torch._fused_adam_`, the kernel `torch.optim.Adam(fused=True)` calls) per
parameter group, with the same tensors, so the numbers are bit for bit those of
`torch.optim.Adam(fused=True)` (tests/test_optim.py). Where that kernel is missing (another
device, an old torch), the same math runs as a few tensor ops on the flat buffers, equal
up to float rounding. The optimizer contract: `param_groups` (dicts with `params` and
`lr`, read at every step), `zero_grad()`, `step()`, `state_dict()`, `load_state_dict()`.
"""

from __future__ import annotations

import math

import torch


class Adam:
    """Adam (Kingma & Ba, 2015) for parameter groups with their own `lr` (and `weight_decay`).
    `fused=False` runs the tensor-op path (equal to the kernel up to float rounding)."""

    def __init__(
        self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, fused: bool = True
    ):
        groups = list(params)
        groups = groups if groups and isinstance(groups[0], dict) else [{"params": groups}]
        defaults = {"lr": float(lr), "betas": tuple(map(float, betas)), "eps": float(eps), "weight_decay": float(weight_decay)}
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.params = [p for g in self.param_groups for p in g["params"]]
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        sizes = [p.numel() for p in self.params]
        self.spans, start = [], 0  # [start, end) of each group in the flat buffers
        for g in self.param_groups:
            n = sum(p.numel() for p in g["params"])
            self.spans.append((start, start + n))
            start += n
        first = self.params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in self.params):
            raise ValueError("modnets.optim.Adam needs every parameter in one dtype on one device")
        views = lambda flat: [v.view_as(p) for p, v in zip(self.params, flat.split(sizes))]  # noqa: E731
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        for p, view in zip(self.params, views(self.flat)):
            p.data = view  # the parameter now lives in the flat buffer (same values)
        self.grad, self.exp_avg, self.exp_avg_sq = (torch.zeros_like(self.flat) for _ in range(3))
        self.grads, self.moments = views(self.grad), (views(self.exp_avg), views(self.exp_avg_sq))
        self.steps = 0
        self.step_t = torch.zeros((), dtype=torch.float32, device=first.device)  # the fused kernel reads the step here
        kernel = hasattr(torch, "_fused_adam_") and first.device.type in ("cpu", "cuda") and first.dtype == torch.float32
        self.fused = bool(fused) and kernel  # False: the tensor-op path

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient; backward then accumulates into its views (`set_to_none` is moot)."""
        self.grad.zero_()
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:  # someone set it to None (or replaced it): point it back at the buffer
                p.grad = g

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        self.step_t += 1
        first = 0
        for group, (a, b) in zip(self.param_groups, self.spans):
            beta1, beta2 = group["betas"]
            n = len(group["params"])
            if self.fused:
                part = slice(first, first + n)
                torch._fused_adam_(
                    self.params[part], self.grads[part], self.moments[0][part], self.moments[1][part], [],
                    [self.step_t] * n, amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                )
            else:
                self._step_ops(group, self.flat[a:b], self.grad[a:b], self.exp_avg[a:b], self.exp_avg_sq[a:b])
            first += n

    def _step_ops(self, group: dict, p, g, m, v) -> None:
        """The fused kernel's math as tensor ops (its operation order, float32)."""
        beta1, beta2 = group["betas"]
        if group["weight_decay"]:
            g = g + p * group["weight_decay"]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt().div_(math.sqrt(1 - beta2**self.steps)).add_(group["eps"])
        p.sub_(m * (group["lr"] / (1 - beta1**self.steps)) / denom)

    def state_dict(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        moments = {"exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone()}
        return {"steps": self.steps, **moments, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.step_t.fill_(self.steps)
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        for group, saved in zip(self.param_groups, state["param_groups"], strict=True):
            group.update(saved)


class ExponentialLR:
    """`lr *= gamma` in every parameter group after each epoch (torch's ExponentialLR, for any
    optimizer with `param_groups`, without importing torch's compiler stack)."""

    def __init__(self, optimizer, gamma: float):
        self.optimizer, self.gamma, self.last_epoch = optimizer, float(gamma), 0

    def step(self) -> None:
        self.last_epoch += 1
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * self.gamma

    def state_dict(self) -> dict:
        return {"gamma": self.gamma, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.gamma, self.last_epoch = float(state["gamma"]), int(state["last_epoch"])
