"""Benchmark: training time of the original README's Boolean commands, with R replicates.

    python scripts/bench.py                          # all cases, R = 1, 8, 32, 128, plus the CLI
    python scripts/bench.py --replicates 1 32 --cases modular shared --device cuda
    python scripts/bench.py --out bench.json         # also write the table as JSON
    python scripts/bench.py --targets                # the interactive-speed targets beside the measurements
    python scripts/bench.py --startup                # where one `modnets-train experiment=modular` spends its time
    python scripts/bench.py --step                   # ms per training step: by hand, through autograd, optimizer, evaluation
    python scripts/bench.py --sync-check --device cuda   # host synchronisations per epoch of CUDA training

"train" is the training loop of one process (forward, backward, optimizer, evaluation of
every split every epoch as the presets do), timed by `results.json`'s `train_time_s`.
"cli" is the whole `modnets-train experiment=...` command end to end (interpreter start,
Hydra, W&B offline run, results files). The original code's times for one run (2-core CPU)
are the reference: a seed sweep of R runs costs R times that.

`--targets` measures the end-to-end commands the speed targets are about (each the median of
`--repeats` runs) and prints each target beside its measurement; `--startup` splits one
end-to-end run (W&B offline, and disabled beside it) into its start (interpreter, imports,
Hydra), build, W&B runs, training, results and its end (files, W&B finishing, exit), from
`results.json`'s `timings_s` and the time it was written, so that a regression, or what W&B
adds, shows where it is. Timings need a quiet machine: on a loaded one they say little.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# preset, seconds of the original code for one run of its README command (2-core CPU)
CASES = {
    "mlp": ("mlp", 132.0),
    "modular": ("modular", 31.0),
    "modular_known": ("modular_known", 31.0),
    "shared": ("shared", 36.0),
    "shared_known": ("shared_known", 36.0),
}


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def time_training(preset: str, replicates: int, device: str, repeats: int, threads: int | None) -> dict:
    from modnets.train import run

    best = math.inf
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            cfg = compose(
                f"experiment={preset}",
                f"trainer.replicates={replicates}",
                f"trainer.device={device}",
                f"trainer.threads={threads or 'null'}",
                "trainer.progress=false",
                "logger.mode=disabled",
                f"output_dir={out}",
            )
            results = run(cfg)
        best = min(best, results[0]["train_time_s"])
    tr = cfg.trainer
    steps = int(tr.epochs) * math.ceil(51 / int(tr.batch_size))  # 51 training rows at fraction 0.8
    heldout = sum(r["final"]["heldout_acc"] for r in results) / len(results)
    return {"seconds": best, "steps": steps, "heldout_acc": heldout}


def time_cli(preset: str, replicates: int, device: str, threads: int | None) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable, "-m", "modnets.train", f"experiment={preset}", f"trainer.replicates={replicates}",
                f"trainer.device={device}", f"trainer.threads={threads or 'null'}", "trainer.progress=false",
                "logger.mode=offline", f"hydra.run.dir={out}",
            ],
            check=True, cwd=ROOT, capture_output=True, env={**os.environ, "WANDB_SILENT": "true"},
        )
        return time.perf_counter() - start


# The interactive-speed targets (2-core CPU): what is measured, the limit, and its unit.
TARGETS = [
    ("cli_1_offline", "modnets-train experiment=modular, W&B offline: end to end", 3.0, "s"),
    ("train_1", "  of which training", 1.0, "s"),
    ("step_1", "  per step at batch 8", 0.7, "ms"),
    ("cli_32_offline", "32 replicates, W&B offline: end to end", 6.0, "s"),
    ("wandb_per_run", "  W&B per replicate run (offline minus disabled, / 32, in pairs)", 50.0, "ms"),
    ("cli_1024_disabled", "1024 replicates, W&B off: end to end", 20.0, "s"),
    ("outside_1024", "  outside training (build, results, recovery, writing files)", 3.0, "s"),
]
# The commit the targets were set against, and its figures then (seconds, quiet 2-core machine):
# `--targets --baseline DIR` (DIR a checkout of it) runs the same commands there, beside this
# checkout's, and scales each measurement by its command's figure over the baseline's time now.
BASELINE_COMMIT = "4dd7aeb"
BASELINE = {
    "cli_1_offline": 6.8, "train_1": 2.0, "cli_32_disabled": 6.4, "cli_32_offline": 12.7, "cli_1024_disabled": 25.7,
}


def cli_run(replicates: int, mode: str, threads: int | None, device: str = "cpu", tree: Path = ROOT) -> dict:
    """One end-to-end `python -m modnets.train experiment=modular` in the checkout `tree`: wall
    seconds, CPU seconds (the process and its children: the W&B worker and W&B's service) and its timings."""
    with tempfile.TemporaryDirectory() as out:
        cpu = cpu_seconds()
        launched, start = time.time(), time.perf_counter()
        subprocess.run(
            [
                sys.executable, "-m", "modnets.train", "experiment=modular", f"trainer.replicates={replicates}",
                f"trainer.device={device}", f"trainer.threads={threads or 'null'}", "trainer.progress=false",
                f"logger.mode={mode}", f"hydra.run.dir={out}",
            ],
            check=True, cwd=tree, capture_output=True, env={**os.environ, "WANDB_SILENT": "true"},
        )
        wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        files = sorted(Path(out).rglob("results.json"))
        result = json.loads(files[0].read_text())
        written = [f.stat().st_mtime for f in files]  # wall_time_s is taken before the files are written
    timings = result.get("timings_s", {})  # results of older versions have none
    return {
        "wall": wall, "cpu": cpu, "train": result["train_time_s"], "inside": result["wall_time_s"], "timings": timings,
        "writing": max(written) - min(written),
        # the run's start (interpreter, imports, Hydra) and end (after the last results.json: pictures, W&B
        # finishing, exit) as this run spent them, the W&B worker's start beside it included
        "before_run": min(written) - launched - sum(timings.values()), "after_results": launched + wall - max(written),
    }


def cpu_seconds() -> float:
    """User + system seconds of this process's finished children (what a loaded machine changes least)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def python_wall(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
    return time.perf_counter() - start


IMPORT = "import os, modnets.train; os._exit(0)"  # without the interpreter's teardown, as modnets-train ends
COMPOSE = """import time, modnets.train, scripts.bench as b
start = time.perf_counter(); b.compose("experiment=modular"); print(time.perf_counter() - start)"""


def compose_seconds() -> float:
    """Seconds Hydra takes to compose the modular preset, in a fresh process that imported modnets.train."""
    out = subprocess.run([sys.executable, "-c", COMPOSE], check=True, cwd=ROOT, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


MACHINE_SPEED = "a fixed Python loop (10^7 additions)"


def machine_speed() -> float:
    """Seconds of a fixed pure-Python loop in a fresh process: how fast this machine is right now.
    A shared machine's speed drifts by half or more within minutes (1.0-1.7 s here on 2026-11-27,
    at load 0): timings taken while this number is high are not the quiet machine's."""
    code = "import time\nt = time.perf_counter()\ns = 0\nfor i in range(10_000_000):\n    s += i\nprint(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout)


def median_of(repeats: int, fn) -> dict:
    """Per key, the median over `repeats` calls of fn() (a dict of numbers, or of dicts of numbers)."""
    return medians([fn() for _ in range(repeats)])


def medians(runs: list[dict]) -> dict:
    """Per key, the median over the runs (dicts of numbers, or of dicts of numbers)."""
    med = lambda values: statistics.median(values)  # noqa: E731
    return {
        k: {j: med([r[k][j] for r in runs]) for j in v} if isinstance(v, dict) else med([r[k] for r in runs])
        for k, v in runs[0].items()
    }


def startup(repeats: int, threads: int | None) -> dict[str, float]:
    """Seconds of each part of one end-to-end run, W&B offline beside W&B disabled (medians of
    `repeats`): the start and the end as the run spent them (from the time its results file was
    written), its phases from `results.json`'s `timings_s`; and the imports and Hydra's composition
    timed alone in fresh processes (what the start costs without the W&B worker beside it)."""
    bare = median_of(repeats, lambda: {"t": python_wall("pass")})["t"]
    imported = median_of(repeats, lambda: {"t": python_wall(IMPORT)})["t"]
    composing = median_of(repeats, lambda: {"t": compose_seconds()})["t"]
    runs = {mode: median_of(repeats, lambda mode=mode: cli_run(1, mode, threads)) for mode in ("offline", "disabled")}

    def parts(run: dict) -> dict[str, float]:
        t = run["timings"]
        return {
            "start: interpreter, imports, Hydra (in the run)": run["before_run"],
            "W&B worker launch": t["wandb_launch"],
            "build (task, model, optimizer)": t["build"],
            "W&B runs opened, recovery baseline": t["open_runs"],
            "training (fit, recovery checkpoints, pictures)": t["train"],
            "results (recovery, FLOPs, summaries)": t["results"],
            "end: results.json, pictures, W&B finishing, exit": run["after_results"],
            "end to end": run["wall"],
        }

    offline, disabled = parts(runs["offline"]), parts(runs["disabled"])
    print(f"one `modnets-train experiment=modular`, median of {repeats}:   W&B offline  disabled  offline adds")
    for name in offline:
        print(f"  {name:<52} {offline[name]:>7.3f} s {disabled[name]:>7.3f} s {offline[name] - disabled[name]:>+7.3f} s")
    alone = {"interpreter start": bare, "imports (modnets.train: torch, hydra, ...)": imported - bare,
             "Hydra: compose the config": composing}
    print("  timed alone, in fresh processes:")
    for name, seconds in alone.items():
        print(f"    {name:<50} {seconds:>7.3f} s")
    return {"offline": offline, "disabled": disabled, "alone": alone, "W&B adds": offline["end to end"] - disabled["end to end"]}


def step_costs(preset: str, replicates: int, threads: int | None, repeats: int, device: str = "cpu") -> dict[str, float]:
    """Milliseconds per training step of one preset in this process (best of `repeats` rounds of 300
    steps on one minibatch): forward and gradients by hand (modnets.step) and through autograd, the
    optimizer step, one evaluation of every split (the presets evaluate every epoch), and one
    epoch's host-side random draws (each replicate's minibatch order from its own generator). On
    CUDA every round ends with a synchronize, so the times include the kernels."""
    import torch
    import torch.nn.functional as F

    from modnets.step import hand_step
    from modnets.train import Evaluator, build, draw_epoch, orders_at_once

    with tempfile.TemporaryDirectory() as out:
        cfg = compose(f"experiment={preset}", f"trainer.replicates={replicates}", f"trainer.threads={threads or 'null'}",
                      f"trainer.device={device}", "logger.mode=disabled", f"output_dir={out}")
        b = build(cfg)
    task, model, optimizer = b.task, b.model, b.optimizer
    hand, evaluator = hand_step(model, getattr(model, "routing", None)), Evaluator(task, int(cfg.trainer.eval_batch_size))
    idx = task.splits["train"][: int(cfg.trainer.batch_size)].expand(replicates, -1)
    n_train = len(task.splits["train"])
    x, task_id, y = task.x[idx], task.task_id[idx], task.y[idx]

    def autograd():
        losses = F.binary_cross_entropy_with_logits(model(x, task_id, {}), y, reduction="none").mean((1, 2))
        optimizer.zero_grad()
        losses.sum().backward()

    def by_hand():
        optimizer.zero_grad()
        hand(x, y)

    parts = {"forward + gradients, through autograd": autograd, "forward + gradients, by hand (modnets.step)": by_hand,
             "optimizer step": optimizer.step, "evaluation of every split (once per epoch)": lambda: evaluator(model, replicates),
             "random draws of one epoch (torch, per replicate)": lambda: draw_epoch(
                 b.generators, n_train, task.x.shape[1:], 0.0, {}, 1, False, task.x.device)}
    if (orders := orders_at_once(b.generators, n_train, plain=True)) is not None:  # as `fit` draws them from 64 replicates
        parts["random draws of one epoch (all replicates at once)"] = lambda: orders(n_train).to(task.x.device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    ms = {}
    for name, fn in parts.items():
        if name.endswith("(modnets.step)") and hand is None:
            continue
        rounds = []
        for _ in range(repeats):
            fn()
            sync()
            start = time.perf_counter()
            for _ in range(300):
                fn()
            sync()
            rounds.append((time.perf_counter() - start) / 300 * 1e3)
        ms[name] = min(rounds)
    print(f"{preset}, R={replicates}, {device}, torch threads {torch.get_num_threads()}: ms per call, best of {repeats} x 300")
    for name, t in ms.items():
        print(f"  {name:<52} {t:>7.3f} ms")
    return ms


def sync_check(preset: str, replicates: int, epochs: tuple[int, int] = (20, 60)) -> dict:
    """Host synchronisations of CUDA training: torch's sync debug mode warns at every synchronising
    call. Two runs of `epochs[0]` and `epochs[1]` epochs; the difference of their counts, per epoch, is
    what training itself syncs: building and results sync once per run, and recovery about ten
    times per run, in both runs alike."""
    import warnings
    from collections import Counter

    import torch

    from modnets.train import run

    counts, places = [], Counter()
    for n in (epochs[0], *epochs):  # the first run warms CUDA up (kernels, handles) and is not counted
        with tempfile.TemporaryDirectory() as out:
            cfg = compose(f"experiment={preset}", f"trainer.replicates={replicates}", "trainer.device=cuda",
                          f"trainer.epochs={n}", "trainer.progress=false", "logger.mode=disabled", f"output_dir={out}")
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run(cfg)
            torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        counts.append(len(syncs))
        if n == epochs[1]:
            places = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    steps = math.ceil(51 / int(cfg.trainer.batch_size))  # 51 training rows at fraction 0.8
    per_epoch = (counts[2] - counts[1]) / (epochs[1] - epochs[0])
    print(f"{preset}, R={replicates}: {counts[1]} syncs in {epochs[0]} epochs, {counts[2]} in {epochs[1]}:"
          f" {per_epoch:.2f} per epoch ({steps} steps per epoch)")
    for place, n in places.most_common(6):
        print(f"  {n:>5}  {place}")
    return {"preset": preset, "replicates": replicates, "syncs_per_epoch": per_epoch, "steps_per_epoch": steps,
            "places": dict(places.most_common(10))}


def targets(repeats: int, threads: int | None, baseline: Path | None = None) -> list[dict]:
    """Measure every target (medians of `repeats`) and print it beside its limit. With `baseline`,
    a checkout of the commit the targets were set against (`BASELINE_COMMIT`), each command also
    runs there, right after this checkout's, and each measurement is also given in the units of the
    machine that set the targets: times that command's figure then (`BASELINE`) over the baseline's
    time now (`scaled`), pair by pair, medians (the W&B row by the disabled baseline's pair)."""
    trees = [ROOT] if baseline is None else [ROOT, baseline.resolve()]

    def both(R: int, mode: str, i: int) -> list[dict]:
        """This checkout's run and the baseline's (in that order), run in turn A B, then B A: a
        drift during a pair falls on either side alike."""
        order = trees if i % 2 == 0 else trees[::-1]
        runs = {tree: cli_run(R, mode, threads, tree=tree) for tree in order}
        return [runs[tree] for tree in trees]

    one = [both(1, "offline", i) for i in range(repeats)]
    # W&B off and on back to back, so that the machine's drift (minutes) cancels from each difference
    pairs = [(both(32, "disabled", i), both(32, "offline", i + 1)) for i in range(repeats)]
    big = [both(1024, "disabled", i) for i in range(repeats if baseline is not None else max(1, repeats // 2))]
    steps = 200 * math.ceil(51 / 8)  # the modular preset: 200 epochs of 51 training rows at batch 8
    per_run = lambda d, o, key="wall": (o[key] - d[key]) / 32 * 1e3  # noqa: E731
    outside = lambda r: r["inside"] - r["train"] + r["writing"]  # noqa: E731
    measures = {  # target: (the runs it is read from, its value from this checkout's run, the baseline's run that scales it)
        "cli_1_offline": (one, lambda r: r[0]["wall"], lambda r: (r[1]["wall"], "cli_1_offline")),
        "train_1": (one, lambda r: r[0]["train"], lambda r: (r[1]["train"], "train_1")),
        "step_1": (one, lambda r: r[0]["train"] / steps * 1e3, lambda r: (r[1]["train"], "train_1")),
        "cli_32_offline": (pairs, lambda p: p[1][0]["wall"], lambda p: (p[1][1]["wall"], "cli_32_offline")),
        "wandb_per_run": (pairs, lambda p: per_run(p[0][0], p[1][0]), lambda p: (p[0][1]["wall"], "cli_32_disabled")),
        "cli_1024_disabled": (big, lambda r: r[0]["wall"], lambda r: (r[1]["wall"], "cli_1024_disabled")),
        "outside_1024": (big, lambda r: outside(r[0]), lambda r: (r[1]["wall"], "cli_1024_disabled")),
    }
    rows = []
    header = f"{'target':<62} {'measured':>9}"
    if baseline is not None:
        header += f" {'baseline now':>13} {'its figure':>11} {'scaled':>9}"
    print(f"{header} {'limit':>7}  met")
    for key, what, limit, unit in TARGETS:
        runs, value_of, scale_of = measures[key]
        value = statistics.median(value_of(r) for r in runs)
        row = {"target": key, "measured": round(value, 3), "limit": limit, "unit": unit}
        line = f"{what:<62} {value:>7.2f}{unit:>2}"
        judged = value
        if baseline is not None:
            now = statistics.median(scale_of(r)[0] for r in runs)
            figure = BASELINE[scale_of(runs[0])[1]]
            judged = statistics.median(value_of(r) * figure / scale_of(r)[0] for r in runs)
            row |= {"baseline_now_s": round(now, 3), "baseline_figure_s": figure, "scaled": round(judged, 3)}
            line += f" {now:>11.2f} s {figure:>9.2f} s {judged:>7.2f}{unit:>2}"
        row["met"] = judged <= limit
        rows.append(row)
        print(f"{line} {limit:>5.1f}{unit:>2}  {'yes' if judged <= limit else 'NO'}")
    wandb_cpu = statistics.median(per_run(d[0], o[0], "cpu") for d, o in pairs)  # not a target: the W&B work, on any core
    print(f"{'  (W&B CPU per replicate run: worker + service, offline minus disabled)':<62} {wandb_cpu:>7.2f}ms")
    rows.append({"target": "wandb_cpu_per_run", "measured": round(wandb_cpu, 3), "limit": None, "unit": "ms", "met": None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--replicates", nargs="*", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="trainer.threads (default: the config's)")
    parser.add_argument("--repeats", type=int, default=1, help="best of N per training timing; median for --targets, --startup")
    parser.add_argument("--cli-replicates", nargs="*", type=int, default=[1, 32], help="R for the end-to-end CLI timings")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--targets", action="store_true", help="only the interactive-speed targets, beside the measurements")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help=f"with --targets: a checkout of {BASELINE_COMMIT}, the code the targets were set against, "
                        "run beside this one (each target also in that machine's units)")
    parser.add_argument("--startup", action="store_true", help="only the breakdown of one end-to-end run")
    parser.add_argument("--step", action="store_true", help="only ms per training step of --cases at --replicates")
    parser.add_argument("--sync-check", action="store_true", help="only host syncs per epoch of CUDA training of --cases")
    args = parser.parse_args()

    import torch

    if args.step:
        steps = {
            f"{case} R={R}": step_costs(CASES[case][0], R, args.threads, max(3, args.repeats), args.device)
            for case in args.cases for R in args.replicates
        }
        if args.out:
            Path(args.out).write_text(json.dumps({"torch": torch.__version__, "step_ms": steps}, indent=1))
        return
    if args.sync_check:
        checks = [sync_check(CASES[case][0], args.replicates[0]) for case in args.cases]
        if args.out:
            Path(args.out).write_text(json.dumps({"torch": torch.__version__, "sync_check": checks}, indent=1))
        return
    if args.targets or args.startup:
        load, speed = os.getloadavg()[0], machine_speed()
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.1f}, {MACHINE_SPEED} {speed:.2f} s"
              " (timings need a quiet machine)")
        meta = {"torch": torch.__version__, "load_average": load, "machine_speed_s": [speed]}
        if args.startup:
            meta["startup"] = startup(args.repeats, args.threads)
        if args.targets:
            meta["targets"] = targets(args.repeats, args.threads, args.baseline)
        meta["machine_speed_s"].append(machine_speed())
        print(f"{MACHINE_SPEED} at the end: {meta['machine_speed_s'][-1]:.2f} s")
        if args.out:
            Path(args.out).write_text(json.dumps(meta, indent=1))
        return

    rows = []
    header = f"{'case':<14} {'R':>4} {'train s':>8} {'steps/s':>8} {'runs/s':>8} {'vs original':>12} {'mean heldout acc':>16}"
    print(f"device {args.device}, torch {torch.__version__}, trainer.threads={args.threads or 'config default'}")
    print(header)
    print("-" * len(header))
    for case in args.cases:
        preset, original = CASES[case]
        for R in args.replicates:
            t = time_training(preset, R, args.device, args.repeats, args.threads)
            row = {
                "case": case, "kind": "train", "replicates": R, "seconds": round(t["seconds"], 3),
                "steps_per_s": round(t["steps"] / t["seconds"], 1), "runs_per_s": round(R / t["seconds"], 3),
                "speedup_vs_original": round(original * R / t["seconds"], 1), "heldout_acc": round(t["heldout_acc"], 4),
            }
            rows.append(row)
            print(
                f"{case:<14} {R:>4} {row['seconds']:>8.2f} {row['steps_per_s']:>8.0f} {row['runs_per_s']:>8.2f}"
                f" {row['speedup_vs_original']:>11.0f}x {row['heldout_acc']:>16.3f}",
                flush=True,
            )
    print()
    print(f"{'end-to-end CLI (W&B offline)':<30} {'R':>4} {'wall s':>8} {'vs original':>12}")
    for case in args.cases:
        preset, original = CASES[case]
        for R in args.cli_replicates:
            seconds = time_cli(preset, R, args.device, args.threads)
            rows.append({"case": case, "kind": "cli", "replicates": R, "seconds": round(seconds, 3),
                         "speedup_vs_original": round(original * R / seconds, 1)})
            print(f"{case:<30} {R:>4} {seconds:>8.2f} {original * R / seconds:>11.0f}x", flush=True)
    if args.out:
        meta = {"device": args.device, "torch": torch.__version__, "threads": args.threads, "rows": rows}
        Path(args.out).write_text(json.dumps(meta, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
