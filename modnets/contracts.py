"""The extension contracts: what train.py needs from a task and a model (docs/extending.md).

A config group's `_target_` may name any importable callable, in modnets or in your own module;
`train.build` checks what it returns against these contracts and says so in one line.

**Task** (`task._target_`): called with the group's keys, returns a `modnets.tasks.Task` (the
class is the contract; subclass it or build one): `x` [rows, ...] float inputs, `y` [rows, n_outputs]
0/1 float targets, `task_id` [rows] long, `splits` {name: row indices} with at least `train`,
`val`, `test` and `heldout`, `circuits` (the ground truth, or None), `noise`, `name`.

**Model** (`model._target_`): called as `target(task=Task, routing=Routing | None, generators=[R
torch.Generator], **keys)`, returns a `Model` below. Replicate r draws its parameters from
`generators[r]`, and every parameter has a leading replicate dimension R, so that R seeds train
as one batched model whose replicates never mix.

**Router**: the `router` group builds a router method (`modnets.routers.Router`, whose module
docstring holds that contract; docs/routing.md), from which models take their selectors.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Model(Protocol):
    """An `nn.Module` mapping inputs to output logits, R replicates at once."""

    def forward(self, x: torch.Tensor, task_id: torch.Tensor, noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x [R, B, *task.x.shape[1:]], task_id [R, B] -> logits [R, B, task.n_outputs]. `noise` holds the
        Gumbel noise of noisy routers by parameter name (None at evaluation); a model without any ignores it."""
        ...

    def routing_summary(self) -> list[dict]:
        """One JSON-able dict per replicate: the wiring the model chose (`{}` for a model without routing);
        written to results.json as `routing`."""
        ...

    def parameters(self):  # an nn.Module's: the optimizer trains those with requires_grad
        ...
