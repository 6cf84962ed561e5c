"""Checkpoint and resume of the training loop (`trainer.checkpoint_every`).

Every `checkpoint_every` epochs, `checkpoint.pt` in the run's output folder gets everything the
rest of training depends on: model, optimizer and scheduler states, every replicate's generator,
torch's global RNG, the epoch, the evaluations so far and which replicates diverged. It is written
atomically (a temporary file, then `os.replace`), so a kill at any moment leaves the previous
checkpoint or the new one. A run started again with the same config and output folder continues
from it and, on the same machine, ends with bit-identical results; the evaluations so far are
replayed through `on_eval`, so the history and the new W&B run are complete. The file is deleted
when training ends.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from modnets.results import UNHASHED, config_hash

NAME = "checkpoint.pt"
# Keys that do not change what is trained (modnets.results.UNHASHED): a checkpoint stays valid when
# only they differ (it may resume on another device).
IGNORED = UNHASHED


def warn(message: str) -> None:
    print(f"modnets: warning: {message}", file=sys.stderr, flush=True)


def fingerprint(cfg) -> str:
    """A hash of the resolved config minus the keys that do not change training."""
    return config_hash(OmegaConf.to_container(cfg, resolve=True), IGNORED)


class Checkpointer:
    """Saves and restores the state of `fit`; does nothing when `trainer.checkpoint_every` is 0."""

    def __init__(self, cfg, model, optimizer, scheduler, generators, extra_state=None):
        self.extra = {k: v for k, v in (extra_state or {}).items() if v is not None}
        self._saved_extra = None
        self.every = int(cfg.trainer.get("checkpoint_every") or 0)
        self.model, self.optimizer, self.scheduler, self.generators = model, optimizer, scheduler, generators
        self.path = Path(cfg.output_dir) / NAME if self.every else None
        self.fingerprint = fingerprint(cfg) if self.every else None
        self.evals: list[tuple[int, torch.Tensor]] = []  # (epoch, metrics [R, splits, 3] on the CPU)
        self.diverged: dict[int, int] = {}  # replicate -> epoch whose training loss was not finite
        self._write_failed = False

    def record(self, epoch: int, metrics: torch.Tensor) -> None:
        if self.every:
            self.evals.append((epoch, metrics.detach().cpu()))

    def resume(self) -> int:
        """Restore the last checkpoint of this config; the last epoch it completed (0: none)."""
        if not self.path or not self.path.exists():
            return 0
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            warn(f"ignoring unreadable checkpoint {self.path} ({type(e).__name__}: {e}); training from the start")
            return 0
        if state.get("fingerprint") != self.fingerprint:
            warn(f"ignoring {self.path}: it belongs to another config; training from the start")
            return 0
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for g, s in zip(self.generators, state["generators"], strict=True):
            g.set_state(s)
        torch.set_rng_state(state["torch_rng"])
        self.evals, self.diverged = list(state["evals"]), dict(state["diverged"])
        self._saved_extra = json.loads(state.get("extra", "{}"))
        print(f"modnets: resuming from {self.path} after epoch {state['epoch']}", file=sys.stderr, flush=True)
        return int(state["epoch"])

    def save(self, epoch: int) -> None:
        """Write the checkpoint after `epoch` when it is a multiple of `checkpoint_every`."""
        if not self.every or epoch % self.every or self._write_failed:
            return
        state = {
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generators": [g.get_state() for g in self.generators],
            "torch_rng": torch.get_rng_state(),
            "evals": self.evals,
            "diverged": self.diverged,
            "extra": json.dumps(self.extra, default=float),  # plain data, loadable with weights_only
        }
        tmp = self.path.with_name(NAME + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, tmp)
            os.replace(tmp, self.path)
        except (OSError, RuntimeError) as e:  # a full disk must not cost the run
            tmp.unlink(missing_ok=True)
            self._write_failed = True
            warn(f"could not write {self.path} ({e}); training goes on without checkpoints")

    def restore_extra(self) -> None:
        """Put the checkpointed `extra_state` lists back in place (after the replay refilled them)."""
        for name, saved in (self._saved_extra or {}).items():
            if name in self.extra:
                self.extra[name][:] = saved

    def remove(self) -> None:
        if self.path:
            self.path.unlink(missing_ok=True)
