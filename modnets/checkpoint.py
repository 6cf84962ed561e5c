"""Checkpoint and resume of the training loop (`trainer.checkpoint_every`).

Every `checkpoint_every` epochs, `checkpoint.pt` in the run's output folder gets everything the
rest of training depends on: model, optimizer and scheduler states, every replicate's generator,
torch's global RNG, the epoch, the evaluations so far and which replicates diverged. It is written
atomically (a temporary file, then `os.replace`), so a kill at any moment leaves the previous
checkpoint or the new one. A run started again with the same config and output folder continues
from it and, on the same machine, ends with bit-identical results; the evaluations so far are
replayed through `on_eval`, so the history and the new W&B run are complete. The file is deleted
(`remove`) only after the run's results files are written, so a results write that fails (a full
disk) leaves it for the relaunch.

File format: one header line `modnets checkpoint <FORMAT> sha256=<hex>` and then the `torch.save`
bytes it hashes. A file without that header, of another format version, or whose bytes do not match
the hash (a flipped bit, a torn copy) is never loaded: one warning line, and training starts over.

On SLURM through submitit, a job nearing its time limit or preempted gets a signal (USR2) whose
handler pickles the job, requeues it and exits at once, mid-epoch. `defer_requeue` makes that signal
only set a flag: the epoch ends, the checkpoint is written (whatever `checkpoint_every` says), and
then submitit's handler requeues the job, which resumes from the checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from modnets.results import UNHASHED, config_hash, one_line, warn, write_atomic

NAME = "checkpoint.pt"
MAGIC, FORMAT = b"modnets checkpoint", 1
KEYS = ("fingerprint", "epoch", "model", "optimizer", "scheduler", "generators", "torch_rng", "evals", "diverged")
# Keys that do not change what is trained (modnets.results.UNHASHED): a checkpoint stays valid when
# only they differ (it may resume on another device).
IGNORED = UNHASHED


def pack(state: dict) -> bytes:
    """The bytes of a checkpoint file: the header line with the payload's sha256, then the payload."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return MAGIC + b" %d sha256=%s\n" % (FORMAT, hashlib.sha256(payload).hexdigest().encode()) + payload


def unpack(data: bytes) -> dict:
    """The state in checkpoint bytes; ValueError naming the problem when they are not a sound
    modnets checkpoint of this format."""
    header, _, payload = data.partition(b"\n")
    fields = header.split(b" ")
    if not header.startswith(MAGIC + b" ") or len(fields) != 4 or not fields[3].startswith(b"sha256="):
        raise ValueError("not a modnets checkpoint (no modnets header)")
    if fields[2] != str(FORMAT).encode():
        raise ValueError(f"checkpoint format {fields[2].decode(errors='replace')}, this modnets reads format {FORMAT}")
    if hashlib.sha256(payload).hexdigest().encode() != fields[3][len(b"sha256="):]:
        raise ValueError("corrupted: its bytes do not match its checksum")
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    missing = [k for k in KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"not a modnets checkpoint (no {', '.join(missing)})")
    return state


_pending: list = []  # (handler, signal) of a deferred requeue signal


def defer_requeue() -> bool:
    """In a submitit job, hold back its requeue signal until `Checkpointer.save`; True when held."""
    sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    handler = signal.getsignal(sig) if sig else None
    if not type(getattr(handler, "__self__", None)).__module__.startswith("submitit"):
        return False  # not a submitit job (or already held)
    signal.signal(sig, lambda signum, frame: _pending.append((handler, signum)))
    return True


def fingerprint(cfg) -> str:
    """A hash of the resolved config minus the keys that do not change training."""
    return config_hash(OmegaConf.to_container(cfg, resolve=True), IGNORED)


class Checkpointer:
    """Saves and restores the state of `fit`; does nothing when `trainer.checkpoint_every` is 0."""

    def __init__(self, cfg, model, optimizer, scheduler, generators, extra_state=None, last_finite=None):
        self.last_finite = last_finite  # train.LastFinite: its tensors are checkpointed too
        self.extra = {k: v for k, v in (extra_state or {}).items() if v is not None}
        self._saved_extra = None
        self.every = int(cfg.trainer.get("checkpoint_every") or 0)
        self.model, self.optimizer, self.scheduler, self.generators = model, optimizer, scheduler, generators
        self.requeue = defer_requeue()  # a SLURM job (submitit): checkpoint when its time is up
        on = self.every or self.requeue
        self.path = Path(cfg.output_dir) / NAME if on else None
        self.fingerprint = fingerprint(cfg) if on else None
        self.evals: list[tuple[int, torch.Tensor]] = []  # (epoch, metrics [R, splits, 3] on the CPU)
        self.diverged: dict[int, int] = {}  # replicate -> epoch whose training loss was not finite
        self._write_failed = False

    def record(self, epoch: int, metrics: torch.Tensor) -> None:
        if self.path:
            self.evals.append((epoch, metrics.detach().cpu()))

    def resume(self) -> int:
        """Restore the last checkpoint of this config; the last epoch it completed (0: none)."""
        if not self.path or not self.path.exists():
            return 0
        try:
            state = unpack(self.path.read_bytes())
        except ValueError as e:  # checked before use: a file that fails is never loaded
            warn(f"ignoring {self.path}: {e}; training from the start")
            return 0
        except Exception as e:
            warn(f"ignoring unreadable checkpoint {self.path} ({one_line(e)}); training from the start")
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
        if self.last_finite is not None and state.get("last_finite") is not None:
            self.last_finite.load(state["last_finite"])
        print(f"modnets: resuming from {self.path} after epoch {state['epoch']}", file=sys.stderr, flush=True)
        return int(state["epoch"])

    def save(self, epoch: int) -> None:
        """Write the checkpoint after `epoch` when it is a multiple of `checkpoint_every` or when a
        requeue signal came (then hand over to its handler, which requeues the job and exits)."""
        if _pending:
            self._write(epoch)
            handler, signum = _pending.pop()
            message = f"modnets: checkpoint after epoch {epoch} written on the requeue signal; submitit takes over"
            print(message, file=sys.stderr, flush=True)
            handler(signum, None)
        elif self.every and epoch % self.every == 0:
            self._write(epoch)

    def _write(self, epoch: int) -> None:
        if self._write_failed:
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
            "last_finite": self.last_finite.state() if self.last_finite is not None else None,
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, pack(state))
        except (OSError, RuntimeError) as e:  # a full disk must not cost the run
            self._write_failed = True
            warn(f"could not write {self.path} ({one_line(e)}); training goes on without checkpoints")

    def restore_extra(self) -> None:
        """Put the checkpointed `extra_state` lists back in place (after the replay refilled them)."""
        for name, saved in (self._saved_extra or {}).items():
            if name in self.extra:
                self.extra[name][:] = saved

    def remove(self) -> None:
        if self.path:
            remove(self.path.parent)


def remove(output_dir) -> None:
    """Delete the checkpoint of a run whose results are written."""
    (Path(output_dir) / NAME).unlink(missing_ok=True)
