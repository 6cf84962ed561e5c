"""A task and a model defined outside modnets (docs/extending.md); tests/test_extending.py runs them."""

import itertools

import torch
from torch import nn

from modnets.tasks import Task, table_splits


class ThresholdTask(Task):
    """Outputs: MAJ(x0, x1, x2) and AND(x3, x4) of every n-bit input; no known circuit (circuits=None)."""

    def __init__(self, n_inputs: int = 6, train_fraction: float = 0.8, split_seed: int = 40, noise: float = 0.0):
        x = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n_inputs)))
        y = torch.stack([(x[:, :3].sum(1) >= 2).float(), x[:, 3] * x[:, 4]], 1)
        task_id = torch.zeros(len(x), dtype=torch.long)
        super().__init__(x, y, task_id, table_splits(len(x), train_fraction, split_seed), None, noise, "threshold")


class LinearModel(nn.Module):
    """Logistic regression, R replicates at once: weights [R, inputs, outputs], replicate r from generators[r]."""

    def __init__(self, task, routing, generators, scale: float = 0.1):
        super().__init__()
        n_in, n_out = task.x.shape[1], task.n_outputs
        self.w = nn.Parameter(torch.stack([torch.randn(n_in, n_out, generator=g) * scale for g in generators]))
        self.b = nn.Parameter(torch.zeros(len(generators), 1, n_out))

    def forward(self, x, task_id, noise=None):  # x [R, B, n_in] -> logits [R, B, n_out]
        return torch.einsum("rbi,rio->rbo", x, self.w) + self.b

    def routing_summary(self):
        return [{} for _ in range(len(self.w))]
