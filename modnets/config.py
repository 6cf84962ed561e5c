"""Configuration errors and the checks that run before any training.

Every mistake in a config ends as one line naming the key, the bad value and what
would fix it (`ConfigError`), never as a stack trace from deep inside torch:

- `validate(cfg)` runs first in `train.build`: types and ranges of the known keys, and for
  every group with a `_target_`, its keys against the target's signature (unknown keys,
  wrong types by the parameter's default);
- `one_line_errors` turns Hydra's own errors (an unknown key in an override, a missing
  config group option, bad override syntax) into one line too;
- `compose_once` makes Hydra compose a single run's config once, not twice;
- `check_memory` refuses, with its estimate, a task or model that would not fit in memory.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from modnets.selection import CRITERIA


class ConfigError(ValueError):
    """A bad config value: `key=value: what is allowed`."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: expected {allowed}")


def check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


# ---------------------------------------------------------------------------------------------
# Value kinds: (test, description)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(low=None):
    return (lambda v: _is_int(v) and (low is None or v >= low)), "an integer" + (f" >= {low}" if low is not None else "")


def number(low=None, high=None, low_open=False, high_open=True, what="a number"):
    def ok(v):
        if not _is_number(v) or not math.isfinite(v):
            return False
        if low is not None and (v <= low if low_open else v < low):
            return False
        return high is None or (v < high if high_open else v <= high)

    lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
    hi = "" if high is None else f"{high}" + (")" if high_open else "]")
    return ok, what + (f" in {lo or '(-inf, '}{hi or 'inf)'}" if (lo or hi) else "")


def optional(kind):
    test, text = kind
    return (lambda v: v is None or test(v)), f"null or {text}"


def int_list(low=1, min_len=0):
    def ok(v):
        return isinstance(v, list) and len(v) >= min_len and all(_is_int(x) and x >= low for x in v)

    return ok, f"a list of integers >= {low}" + (f" with at least {min_len} entries" if min_len else "")


BOOL = (lambda v: isinstance(v, bool)), "true or false"
STRING = (lambda v: isinstance(v, str)), "a string"

# Keys with a range or a kind their defaults cannot tell (null defaults, lists). Absent keys are skipped,
# so these rules also hold for groups that only some configs have.
RULES = {
    "seed": integer(),
    "trainer.epochs": integer(1),
    "trainer.batch_size": integer(1),
    "trainer.eval_every": integer(1),
    "trainer.eval_batch_size": integer(1),
    "trainer.lr_gamma": number(0, low_open=True, what="a positive decay factor"),
    "trainer.device": STRING,
    "trainer.replicates": integer(1),
    "trainer.threads": optional(integer(1)),
    "trainer.progress": BOOL,
    "trainer.checkpoint_every": integer(0),
    "trainer.deterministic": BOOL,
    "trainer.select": ((lambda v: v in CRITERIA), f"one of {', '.join(CRITERIA)} (modnets.selection)"),
    "trainer.population": optional(integer(1)),
    "optimizer.lr": number(0, low_open=True, what="a positive learning rate"),
    "optimizer.weight_decay": number(0, what="a weight decay"),
    "optimizer.momentum": number(0, 1, what="a momentum"),
    "router.topk": integer(1),
    "router.tau": number(0, low_open=True, what="a positive temperature"),
    "router.lr": number(0, what="a learning rate"),
    "router.location_lr": number(0, what="a learning rate"),
    "router.tau_end": optional(number(0, low_open=True, what="a positive temperature")),
    "router.anneal": ((lambda v: v in ("exponential", "linear", "cosine")), "exponential, linear or cosine"),
    "router.entropy": number(0, what="a non-negative weight"),
    "router.duplicate": number(0, what="a non-negative weight"),
    "router.max_sets": integer(1),
    "router.init_scale": number(0, what="a non-negative scale"),
    "model.init": ((lambda v: v in ("torch", "lsuv")), "torch or lsuv"),
    "task.modularity": int_list(1, min_len=2),
    "task.train_fraction": number(0, 1, low_open=True, what="a fraction"),
    "task.noise": number(0, what="a noise std"),
    "task.samples": optional(integer(3)),
    "task.n_inputs": optional(integer(1)),  # null for task=circuit with task.circuits
    "task.widths": optional(int_list(1, min_len=1)),
    "model.hidden": int_list(1),
    "model.num_modules": optional(int_list(1, min_len=1)),
    "model.widen": integer(1),
    "model.library_size": optional(integer(1)),
    "model.prune_percent": number(0, 100, what="a percentage"),
}
GROUPS = ("task", "model", "router", "optimizer", "logger")


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _target_params(target: str):
    """The parameters of a `_target_` (None when it takes **kwargs or cannot be inspected)."""
    from hydra.utils import get_object

    try:
        params = inspect.signature(get_object(target)).parameters
    except Exception:  # an unknown target is reported by instantiate itself
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return params


def _kind_of_default(default):
    """Kind of a signature default: bool, int, float or str (None for anything else)."""
    if isinstance(default, bool):
        return BOOL
    if _is_int(default):
        return integer()
    if isinstance(default, float):
        return number()
    if isinstance(default, str):
        return STRING
    return None


INT64 = 2**63


def _huge_ints(node, prefix: str = ""):
    """(key, value) of every integer in a plain config that does not fit 64 bits (what torch takes)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        key = f"{prefix}[{k}]" if isinstance(node, list) else f"{prefix}.{k}" if prefix else str(k)
        if _is_int(v) and not -INT64 <= v < INT64:
            yield key, v
        yield from _huge_ints(v, key)


def validate(cfg: DictConfig) -> None:
    """Every known key's type and range, and every target group's keys against its target."""
    for key, value in _huge_ints(OmegaConf.to_container(cfg, resolve=False)):
        raise ConfigError(key, value, "an integer that fits in 64 bits (below 2**63)")
    for key, (ok, allowed) in RULES.items():
        section, _, name = key.rpartition(".")
        node = cfg.get(section) if section else cfg
        if not isinstance(node, DictConfig) or name not in node:
            continue
        value = _plain(node[name])
        check(ok(value), key, value, allowed)
    for group in GROUPS:
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        params = _target_params(str(node._target_))
        if params is None:
            continue
        for name in node:
            if str(name).startswith("_") or f"{group}.{name}" in RULES:
                continue
            key = f"{group}.{name}"
            if name not in params:
                known = ", ".join(p for p in params if p not in ("self", "params", "task", "routing", "generators"))
                raise ConfigError(key, _plain(node[name]), f"a key of {node._target_}: {known}")
            kind = _kind_of_default(params[name].default)
            value = _plain(node[name])
            if kind is not None and value is not None:
                ok, allowed = kind
                check(ok(value), key, value, allowed)
    trainer_keys = set()
    from modnets import CONF_DIR

    for path in (CONF_DIR / "trainer").glob("*.yaml"):
        trainer_keys |= set(OmegaConf.load(path).keys())
    for name in cfg.get("trainer", {}) if trainer_keys else ():
        if name not in trainer_keys:
            allowed = f"a key of trainer: {', '.join(sorted(trainer_keys))}"
            raise ConfigError(f"trainer.{name}", _plain(cfg.trainer[name]), allowed)
    size, replicates = cfg.get("trainer", {}).get("population"), cfg.get("trainer", {}).get("replicates", 1)
    if size is not None:
        check(int(replicates) % int(size) == 0, "trainer.population", size, f"a divisor of trainer.replicates={replicates}")


# ---------------------------------------------------------------------------------------------
# Resource guard

GB = 1024**3


def available_memory(device) -> int | None:
    """Bytes that can still be allocated on the device (None when unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def data_estimate(task: DictConfig, replicates: int) -> tuple[str, object, int, int] | None:
    """(key, value, rows, bytes) of a task config, from its keys alone (None: no estimate).

    Counts the float inputs and targets, ids and split indices, the construction copies and the
    evaluation's per-row metrics of every replicate; activations are not counted."""
    get = lambda k, d=None: _plain(task.get(k, d))  # noqa: E731
    if get("samples_per_pair_train") is not None:  # digit pairs: 64 pairs, two images each
        per_pair = int(get("samples_per_pair_train")) + 3 * int(get("samples_per_pair_test", 0) or 0)
        rows, width = 64 * per_pair, 2 * (784 if get("source") == "mnist" else 64) + 6
        key, value = "task.samples_per_pair_train", get("samples_per_pair_train")
    elif get("n_inputs") is not None:
        n = int(get("n_inputs"))
        widths = get("widths") or [get("n_outputs", 1)]
        samples = get("samples")
        rows = int(samples) if samples is not None and (n > 62 or int(samples) < 2**n) else 2**n
        width, key, value = n + int(widths[-1]), ("task.samples" if samples is not None else "task.n_inputs"), samples or n
    elif get("modularity") is not None:
        modularity = get("modularity")
        rows, width = 2 ** int(modularity[0]) * max(1, len(get("tasks") or [0])), int(modularity[0]) + int(modularity[-1])
        key, value = "task.modularity", modularity
    else:
        return None
    per_row = 2 * 4 * width + 32 + 12 * replicates  # float x and y, built then copied; ids and splits; metrics
    return key, value, rows, rows * per_row


# Start-up per replicate before the first step: its folder, and its W&B run when W&B is on (about an
# hour for 100,000 replicates with W&B offline).
START_S = {"folder": 0.002, "wandb": 0.035}
RESULT_BYTES_PER_EVAL = 500  # one history entry of results.json (6 splits x 3 metrics), about


def sanity_warnings(cfg: DictConfig) -> list[str]:
    """One line per part of a run that is absurdly large before it starts: minutes of start-up
    (folders and W&B runs of every replicate), or gigabytes of results histories."""
    tr, lines = cfg.trainer, []
    replicates, evals = int(tr.replicates), int(tr.epochs) // int(tr.eval_every) + 1
    wandb = str(cfg.get("logger", {}).get("mode", "disabled")) in ("offline", "online")
    start = replicates * (START_S["folder"] + START_S["wandb"] * wandb)
    if start > 300:
        fix = "logger.mode=disabled or fewer replicates" if wandb else "fewer replicates"
        lines.append(
            f"trainer.replicates={replicates}: about {start / 60:,.0f} min estimated to open {replicates:,} run folders"
            + (" and W&B runs" if wandb else "") + f" before the first step ({fix})"
        )
    size = replicates * evals * RESULT_BYTES_PER_EVAL
    if size > GB:
        lines.append(
            f"trainer.eval_every={int(tr.eval_every)}: about {size / GB:,.1f} GB of results.json histories estimated "
            f"({replicates:,} replicates x {evals:,} evaluations; raise trainer.eval_every)"
        )
    return lines


def check_memory(what: str, key: str, value, needed: int, device) -> None:
    """Refuse `needed` bytes (with the estimate) when they exceed what the device has available."""
    free = available_memory(device)
    if free is not None and needed > 0.9 * free:
        allowed = f"{what} that fits in memory: about {needed / GB:,.1f} GB estimated, {free / GB:,.1f} GB available on {device}"
        raise ConfigError(key, value, allowed)


# ---------------------------------------------------------------------------------------------
# Hydra's own errors as one line


def _one_line(e: BaseException) -> str:
    from hydra.errors import MissingConfigException, OverrideParseException

    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, MissingConfigException) and e.options:
        name = (e.missing_cfg_file or "").strip("/")
        extra = " (the joblib and submitit launchers come with pip install 'modnets[sweeps]')" if "launcher" in name else ""
        return f"{name}: no such config; expected one of {', '.join(e.options)}{extra}"
    if isinstance(e, OverrideParseException):
        return f"{e.override}: not a valid override ({lines[0] if lines else e.message})"
    cause = e.__cause__
    key, parent = getattr(cause, "full_key", None), getattr(cause, "parent_node", None)
    if key and "not in struct" in str(cause):
        known = ", ".join(str(k) for k in (parent.keys() if parent is not None else []) if not str(k).startswith("_"))
        return f"{key}: unknown key; expected one of {known} (+{key}=... adds a new key)"
    if cause is not None:
        lines += [line.strip() for line in str(cause).splitlines() if line.strip()]
    return " ".join(lines)


def one_line_errors(entry):
    """Wrap a `@hydra.main` entry point: Hydra's composition errors (unknown key, missing
    option, bad override syntax) become one stderr line and exit code 2, a run folder Hydra
    cannot create or write one line and exit code 1. Setting
    HYDRA_FULL_ERROR=1 keeps Hydra's own reports."""

    @functools.wraps(entry)
    def wrapper(*args, **kwargs):
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            return entry(*args, **kwargs)
        from hydra.errors import HydraException

        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing many lines
        try:
            return entry(*args, **kwargs)
        except HydraException as e:
            print(f"modnets: config error: {_one_line(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as e:  # Hydra could not create or write the run folder
            from modnets.results import os_problem

            print(f"modnets: error: cannot create or write the output folder: {os_problem(e)}", file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            os.environ.pop("HYDRA_FULL_ERROR", None)

    return wrapper


def compose_once(entry):
    """Wrap a `@hydra.main` entry point so that Hydra composes a single run's config once.

    Hydra 1.3 composes every command's config twice: once only to read `hydra.mode` (is it a
    sweep?) and again to run (0.1 s each for `experiment=modular`). Here the first composition is
    the run's own (`RunMode.RUN`, as `Hydra.run` asks for it) and is kept for it: when the run then
    asks, it gets that config, with the `hydra.mode=RUN` override that Hydra adds when no config set
    a mode (tests/test_startup.py checks that both ways give the same config, `hydra:` included).
    Sweeps (`-m`, or a preset setting `hydra.mode`), and any composition error, take Hydra's own path."""

    @functools.wraps(entry)
    def wrapper(*args, **kwargs):
        try:
            from hydra._internal.config_loader_impl import ConfigLoaderImpl
            from hydra._internal.hydra import Hydra
            from hydra.types import RunMode
        except ImportError:  # another Hydra: its own way
            return entry(*args, **kwargs)
        get_mode, load = Hydra.get_mode, ConfigLoaderImpl.load_configuration
        kept = {}

        def first_get_mode(self, config_name, overrides):
            try:
                cfg = load(self.config_loader, config_name=config_name, overrides=list(overrides), run_mode=RunMode.RUN)
            except Exception:  # what Hydra does reports it
                return get_mode(self, config_name, overrides)
            if cfg.hydra.mode not in (None, RunMode.RUN):
                return get_mode(self, config_name, overrides)
            kept[config_name, tuple(overrides)] = cfg
            return cfg.hydra.mode

        def load_kept(self, config_name, overrides, run_mode, from_shell=True, validate_sweep_overrides=True):
            added = overrides[-1:] == ["hydra.mode=RUN"]
            cfg = kept.pop((config_name, tuple(overrides[:-1] if added else overrides)), None)
            if cfg is None or run_mode != RunMode.RUN or not (from_shell and validate_sweep_overrides):
                return load(self, config_name, overrides, run_mode, from_shell, validate_sweep_overrides)
            if added:  # as Hydra applies the override it added
                cfg.hydra.mode = RunMode.RUN
                cfg.hydra.overrides.hydra.append("hydra.mode=RUN")
            return cfg

        Hydra.get_mode, ConfigLoaderImpl.load_configuration = first_get_mode, load_kept
        try:
            return entry(*args, **kwargs)
        finally:
            Hydra.get_mode, ConfigLoaderImpl.load_configuration = get_mode, load

    return wrapper


def check_model_memory(cfg, build_model, task, routing, replicates: int, device) -> None:
    """Refuse a model whose parameters, gradients and optimizer state (4 floats per parameter)
    over all replicates would not fit: one replicate is built first (on the meta device when
    the config has widths over 2048, so that nothing is allocated) and its size multiplied."""
    numbers = [v for v in OmegaConf.to_container(cfg.model, resolve=True).values() if v is not None]
    numbers = [x for v in numbers for x in (v if isinstance(v, list) else [v]) if isinstance(x, int)]
    big = max([*numbers, math.prod(task.x.shape[1:])]) > 2048
    try:
        with torch.device("meta") if big else contextlib.nullcontext():
            probe = build_model(task=task, routing=routing, generators=[torch.Generator()])
    except ConfigError:
        raise
    except Exception:  # the real build reports it
        return
    if not isinstance(probe, torch.nn.Module):  # the real build reports it (the model contract)
        return
    params = sum(p.numel() for p in probe.parameters())
    needed = replicates * (16 * params + 4 * sum(b.numel() for b in probe.buffers()))
    what = f"a model ({params:,} parameters per replicate x {replicates} replicates)"
    check_memory(what, "trainer.replicates" if replicates > 1 else "model", replicates if replicates > 1 else cfg.model._target_,
                 needed, device)
