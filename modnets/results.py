"""Results files: the contract between a run and every tool that reads it.

One `results.json` per run (per replicate), written atomically. A run is identified by
the hash of its resolved config, so that a relaunched sweep skips what already finished,
and a sweep job that raised leaves a `failed` results file instead of stopping the sweep.

Every file carries `format` (FORMAT) and `checksum`, the sha256 of the rest of it as the file
encodes it (`encode`: each file is encoded once; files of format 1 are still read and checked);
`problem` says why a loaded file is not a sound modnets results file (foreign, of another
format, edited or corrupted), and such a file is never trusted: a sweep reruns the job, the
aggregator lists it apart.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: no lock
    fcntl = None

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """The commit of the modnets checkout this package runs from; None for an installed copy
    (site-packages is no checkout, even when it sits inside some other git repository)."""
    if not ((ROOT / ".git").exists() and (ROOT / "pyproject.toml").is_file() and (ROOT / "conf").is_dir()):
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def best_entry(history: list[dict]) -> dict:
    """The evaluation with the highest validation accuracy (ties: lower validation loss, then earlier)."""
    return max(history, key=lambda h: (h.get("val_acc", 0.0), -h.get("val_loss", 0.0), -h["epoch"]))


@contextlib.contextmanager
def paused_gc():
    """Python's cycle collector off while a run builds its results: millions of new long-lived
    objects (histories, results files) that it would otherwise scan again and again for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def dumps(data: dict) -> str:
    """JSON with one line per top-level key and one line per row of a list of rows (the history):
    readable, and written by json's C encoder (an indented dump runs its Python one, 2-3x slower)
    or, for a table of numbers (the history), column by column (`table_rows`), the same text."""
    lines = []
    for key, value in data.items():
        if isinstance(value, (list, tuple)) and value and all(isinstance(row, dict) for row in value):
            rows = table_rows(value) or [json.dumps(row) for row in value]
            body = "[\n  " + ",\n  ".join(rows) + "\n ]"
        else:
            body = json.dumps(value)
        lines.append(f" {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


NOT_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}  # json's spelling


def table_rows(rows: list[dict]) -> list[str] | None:
    """`json.dumps` of each row of a table whose rows have the same string keys and whose columns
    hold only ints or only floats (None for any other list of rows). A history's floats repeat
    (accuracies are a few fractions), and formatting a float is most of the cost of writing the
    results: each distinct value of a column is formatted once."""
    keys = tuple(rows[0])
    if not keys or not all(type(k) is str for k in keys) or not all(map(keys.__eq__, map(tuple, rows))):
        return None
    columns = []
    for column in zip(*map(dict.values, rows)):
        kinds = set(map(type, column))
        if kinds == {int}:
            columns.append(map(int.__repr__, column))
        elif kinds == {float}:
            columns.append(float_texts(column))
        else:
            return None
    template = "{" + ", ".join(json.dumps(k) + ": %s" for k in keys) + "}"
    return list(map(template.__mod__, zip(*columns)))


def float_texts(column: tuple[float, ...]) -> list[str]:
    """json's text of each float: its repr (NaN and infinities spelled as json spells them)."""
    distinct = set(column)
    if 2 * len(distinct) > len(column):  # mostly distinct (a loss): format each
        texts = list(map(float.__repr__, column))
    else:
        texts = list(map(dict(zip(distinct, map(float.__repr__, distinct))).__getitem__, column))
        if 0.0 in distinct:  # 0.0 and -0.0 are one key of the dict: format zeros one by one
            texts = [repr(v) if v == 0.0 else t for v, t in zip(column, texts)]
    if not all(map(math.isfinite, distinct)):
        texts = [NOT_FINITE.get(t, t) for t in texts]
    return texts


def arch_label(config: dict) -> str:
    """mlp, modular/shared + known/known outputs or the router method (learned, gumbel, soft, ...), + wide
    with spare modules (model.widen > 1), from a resolved config."""
    model, router = config.get("model", {}), config.get("router", {})
    target = str(model.get("_target_", ""))
    if "MLP" in target or "modular" not in target.lower() and "Modular" not in target:
        return target.rsplit(".", 1)[-1].lower() or "model"
    kind = "shared" if model.get("shared") else "modular"
    known = [router.get("known_inputs"), router.get("known_outputs")] + (
        [router.get("known_locations")] if kind == "shared" else []
    )
    if all(known):
        return f"{kind} known"
    if router.get("known_outputs") and not any(known[:1] + known[2:]):
        return f"{kind} known outputs"
    method = str(router.get("_target_", "")).rsplit(".", 1)[-1].lower() or "learned"  # the router method's class
    label = f"{kind} gumbel" if method == "learned" and router.get("gumbel") else f"{kind} {method}"
    return label + (" wide" if int(model.get("widen") or 1) > 1 else "")  # spare modules (model.widen)


def warn(message: str) -> None:
    print(f"modnets: warning: {message}", file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file, flushed to the disk, then `os.replace`: a reader (or a
    crash) sees the old file or the whole new one. On an error (a full disk) nothing new is left."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


FORMAT = "modnets-results-2"
FORMAT_1 = "modnets-results-1"  # still read: its checksum is over a canonical (sorted-key) encoding
FORMATS = (FORMAT_1, FORMAT)


def checksum(result: dict) -> str:
    """sha256 of a results dict without its `checksum`. Format 2: of the file's own encoding of the
    rest (`dumps`, keys in file order), so that writing encodes each file once and hashes those
    bytes; format 1: of a canonical encoding (sorted keys)."""
    body = {k: v for k, v in result.items() if k != "checksum"}
    if result.get("format") == FORMAT_1:
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(dumps(body).encode()).hexdigest()


def sealed(result: dict, digest: str) -> dict:
    """The results dict as `encode` seals it with this checksum: the rest, `format`, then `checksum`."""
    return {k: v for k, v in result.items() if k != "checksum"} | {"format": FORMAT, "checksum": digest}


def encode(result: dict) -> tuple[dict, bytes]:
    """A results dict sealed with `format` and `checksum`, and the bytes of its file: the rest is
    encoded once, hashed, and the checksum appended as the last key."""
    text = dumps({k: v for k, v in result.items() if k != "checksum"} | {"format": FORMAT})
    digest = hashlib.sha256(text.encode()).hexdigest()
    return sealed(result, digest), (text[: -len("\n}\n")] + f',\n "checksum": "{digest}"\n}}\n').encode()


def seal(result: dict) -> dict:
    return encode(result)[0]


def problem(result) -> str | None:
    """Why a loaded results.json is not a sound modnets results file; None when it is."""
    if not isinstance(result, dict):
        return f"not a modnets results file (a JSON {type(result).__name__}, not an object)"
    if "checksum" not in result:
        return "not a modnets results file (no checksum)"
    if result.get("format") not in FORMATS:
        return f"results format {result.get('format')!r}; this modnets reads {' and '.join(map(repr, FORMATS))}"
    if result["checksum"] != checksum(result):
        return "corrupted or edited: its content does not match its checksum"
    return None


def write_json(path: Path, data: dict) -> dict:
    """A results file, sealed with its checksum, written atomically; returns what it wrote."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data, content = encode(data)
    write_atomic(path, content)
    return data


FORK_FROM = 64  # results files: from this many on, a forked copy of the process writes half of them


def write_jsons(paths: list[Path], data: list[dict]) -> list[dict | OSError]:
    """`write_json` of many files at once: what each wrote, or its error. Their fsyncs overlap
    (the file system commits them together: 1024 results files in ~0.3 s instead of ~4 s one
    after the other); each file is still flushed to the disk before it replaces the old one.
    Encoding (formatting floats) is most of the time and holds the GIL: from FORK_FROM files on,
    a forked copy of this process encodes and writes the second half on the other core and sends
    back only each file's checksum (or error); if it cannot start or dies, this process does it."""
    half = len(paths) // 2
    if len(paths) < FORK_FROM or "fork" not in multiprocessing.get_all_start_methods():
        return write_many(paths, data)
    fork = multiprocessing.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    sys.stdout.flush(), sys.stderr.flush()  # else the copy writes what is still buffered once more
    child = fork.Process(target=lambda: send.send([answer(w) for w in write_many(paths[half:], data[half:])]))
    try:
        child.start()
    except OSError:  # no memory or processes left to fork: all here
        return write_many(paths, data)
    send.close()
    try:
        mine = write_many(paths[:half], data[:half])
        theirs = receive.recv()
    except EOFError:  # the copy died before it answered
        theirs = None
    finally:
        child.join()
    if theirs is None:
        return mine + write_many(paths[half:], data[half:])
    return mine + [t if isinstance(t, OSError) else sealed(d, t) for d, t in zip(data[half:], theirs)]


def write_many(paths: list[Path], data: list[dict]) -> list[dict | OSError]:
    """`write_jsons` in this process: the fsyncs overlap in threads."""

    def write(path: Path, content: dict) -> dict | OSError:
        try:
            return write_json(path, content)
        except OSError as e:
            return e

    if len(paths) < 2:
        return [write(path, content) for path, content in zip(paths, data)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(write, paths, data))


def answer(written: dict | OSError) -> str | OSError:
    """What the forked copy sends back for a file: its checksum, or its error."""
    return written if isinstance(written, OSError) else written["checksum"]


class RunError(RuntimeError):
    """A fault outside the config (a file, a folder, a full disk): one line naming the path and the problem."""


class FolderBusy(RunError):
    """Another process holds the run folder's lock."""


def os_problem(e: OSError) -> str:
    """`PATH: problem` of an OSError (its message when it names no path)."""
    return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else one_line(e)


LOCK = ".modnets.lock"


@contextlib.contextmanager
def lock_folder(out: Path):
    """Hold an advisory lock (`fcntl.flock`) on `out/.modnets.lock` while the run lives: a second
    process on the same folder stops with FolderBusy instead of writing over the first one's files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / LOCK, "a+")  # noqa: SIM115 (held open for the run's duration)
    except OSError as e:
        raise RunError(f"cannot create or write the output folder: {os_problem(e)}") from None
    with f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                pid = f.read().strip()
                raise FolderBusy(
                    f"{out} is in use by another modnets process{f' (pid {pid})' if pid else ''}; "
                    "wait for it to end or choose another output folder"
                ) from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def clear_failure(out: Path, replicates: int) -> None:
    """A replicated job writes `seed_*/results.json`: its own `failed` record in `out`, left by an
    earlier try, is removed so that it does not outlive the retry."""
    path = out / "results.json"
    if replicates == 1 or not path.exists():
        return
    try:
        stale = json.loads(path.read_text()).get("status") == "failed"
    except (OSError, ValueError, AttributeError):
        return
    if stale:
        path.unlink(missing_ok=True)


def replicate_config(cfg: DictConfig, r: int) -> dict:
    """The resolved config of replicate r: exactly the config of a single run with seed + r
    (`trainer.select` none: selected runs are written apart, modnets.selection)."""
    return replicate_configs(cfg, [r])[0]


def replicate_configs(cfg: DictConfig, replicates) -> list[dict]:
    """replicate_config of each r in `replicates`, resolving the config once (1024 seeds: once, not 1024 times)."""
    resolved = pickle.dumps(OmegaConf.to_container(cfg, resolve=True))  # a copy per replicate: loads is 10x deepcopy's speed
    configs = []
    for r in replicates:
        config = pickle.loads(resolved)
        config["seed"] = int(cfg.seed) + r
        config["trainer"]["replicates"] = 1
        if "select" in config["trainer"]:  # one replicate: nothing to select among
            config["trainer"] |= {"select": "none", "population": None}
        configs.append(config)
    return configs


def output_dirs(out: Path, seeds: list[int]) -> list[Path]:
    return [out] if len(seeds) == 1 else [out / f"seed_{s}" for s in seeds]


# The config keys that do not change what a run computes: where it writes, how it logs and reports,
# on which device, threads and evaluation chunks it runs, how often it checkpoints. The one list:
# the results hash (a relaunched sweep skips a job whose every replicate has a results file with
# this hash and a final status), the checkpoint fingerprint and the aggregator's grouping all ignore them.
UNHASHED = (
    "output_dir",
    "logger",
    "trainer.progress",
    "trainer.threads",
    "trainer.checkpoint_every",
    "trainer.device",
    "trainer.eval_batch_size",
)
FINAL = ("completed", "diverged")


def config_hash(config: dict, ignore=UNHASHED) -> str:
    """A short hash of a resolved config without the keys in `ignore` (dotted paths)."""
    drop = {tuple(key.split(".")) for key in ignore}

    def kept(node, path=()):  # the config without the ignored keys (a copy; the config is left as it is)
        if not isinstance(node, dict):
            return node
        return {k: kept(v, (*path, k)) for k, v in node.items() if (*path, k) not in drop}

    return hashlib.sha256(json.dumps(kept(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_results(cfg: DictConfig) -> list[dict] | None:
    """The results of every replicate when all are on disk with this config's hash, else None."""
    seeds = [int(cfg.seed) + r for r in range(int(cfg.trainer.replicates))]
    base = replicate_config(cfg, 0)  # resolved once: replicate r differs only in its seed
    results = []
    for r, d in enumerate(output_dirs(Path(cfg.output_dir), seeds)):
        path = d / "results.json"
        if not path.exists():
            return None
        try:
            result = json.loads(path.read_text())
            bad = problem(result)
        except (OSError, ValueError) as e:
            bad = f"unreadable ({one_line(e)})"
        if bad:
            warn(f"ignoring {path}: {bad}; the job runs again")
            return None
        if result.get("status") not in FINAL or result.get("config_hash") != config_hash(base | {"seed": seeds[r]}):
            return None
        results.append(result)
    return results or None


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(cfg: DictConfig, error: Exception) -> None:
    """A sweep job that raised: results.json with status `failed` and the error, so that the
    other jobs go on and the aggregator reports it. A failure that cannot be recorded (a full
    disk) is reported on stderr, and the sweep goes on all the same."""
    message = one_line(error)
    out = Path(HydraConfig.get().runtime.output_dir)
    job = f"modnets: job {HydraConfig.get().job.num} failed ({out}): {message}"
    try:
        try:
            config = OmegaConf.to_container(cfg, resolve=True)
        except Exception:
            config = OmegaConf.to_container(cfg, resolve=False)
        result = {"status": "failed", "error": message, "traceback": traceback.format_exc(), "config": config}
        write_json(out / "results.json", result | {"config_hash": config_hash(config), "git_commit": git_commit()})
    except Exception as e:
        job += f"; not recorded: could not write {out / 'results.json'} ({one_line(e)})"
    print(job, file=sys.stderr, flush=True)
