"""Roll sweeps up into a table and figures: `python scripts/aggregate.py MULTIRUN_DIR... [--out DIR]`.

Reads every `results.json` under the given folders (replicates under `seed_*/` and separately
launched runs alike), groups runs whose configs differ only in `seed` (and in where and how they
were logged), and writes to `--out` (default: `aggregate/` in the first folder). A population's
`selected/results.json` (`trainer.select`) is one run of its own configuration, "best of R": its
`trainer.replicates` counts, its seed is the population's base seed. Output:

- `summary.csv`: one row per configuration: the config keys that vary across the sweep, `arch`,
  `n` (seeds), and for every metric `_mean`, `_std` (sample std) and `_ci95` (half-width of the 95%
  Student-t interval over seeds: mean ± ci95);
- `runs.csv`: one row per run; `failures.csv`: every file not counted, with why: a run whose status
  is not `completed`, an unreadable or malformed file, a file modnets did not write (no valid
  checksum), a run with a NaN or inf metric, a second copy of a run (same config hash and seed);
- `heldout_vs_fraction.png`, `learning_curves.png`, `recovery.png` (with `--plots`, the default).

With `--wandb`, the summary (a W&B table, one row per configuration) and the figures (images) go
to one W&B run of `job_type=aggregate` in the sweep's W&B group (the group its training runs
logged to), so that the group page shows the study; offline by default (`--wandb-mode`), written
under `--out`, uploaded later with `wandb sync`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from modnets.results import UNHASHED, arch_label, problem

# Config keys that do not define a configuration: the seed and replicate count (runs differing only
# in them are one configuration's seeds) and the keys that do not change a run (modnets.results).
IGNORED = ("seed", "trainer.replicates", *UNHASHED)
SKIP_DIRS = {"wandb", ".submitit", ".hydra", "checkpoints"}
ARCH_ORDER = ["mlp", "modular learned", "modular known", "shared learned", "shared known"]


def ignored(key: str) -> bool:
    """A flattened config key (`a.b.c`) that is, or lies under, one of IGNORED."""
    return any(key == k or key.startswith(k + ".") for k in IGNORED)


def find_results(roots: list[str]) -> list[Path]:
    paths = []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            if "results.json" in files:
                paths.append(Path(folder) / "results.json")
    return paths


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def metrics_of(result: dict) -> dict[str, float]:
    """The scalar metrics of one completed run."""
    m = {f"final.{k}": v for k, v in result.get("final", {}).items() if k != "epoch"}
    m |= {f"best.{k}": v for k, v in result.get("best", {}).items()}
    for k, v in flatten(result.get("recovery") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            m[f"recovery.{k}"] = v
    m |= {f"params.{k}": v for k, v in (result.get("params") or {}).items()}
    flops = result.get("flops")
    if isinstance(flops, dict):
        m |= {f"flops.{k}": v for k, v in flops.items() if isinstance(v, (int, float))}
    for k in ("train_time_s", "wall_time_s"):
        if isinstance(result.get(k), (int, float)):
            m[k] = result[k]
    return m


def load(paths: list[Path]):
    """Completed runs as dicts (config key, config, metrics, curve, ...) and every other file as a
    failure: failed or diverged runs, unreadable, malformed or foreign files (`results.problem`:
    no valid modnets checksum), runs with a NaN or inf metric, and a second copy of a run
    (same config hash and seed) found in another folder. Never raises on a file's content."""
    runs, failures, seen = [], [], {}
    for path in paths:
        try:
            run, reason = read_run(path)
        except (OSError, ValueError) as e:
            run, reason = None, ("unreadable", " ".join(str(e).split()))
        except (KeyError, TypeError, AttributeError, IndexError) as e:  # sealed, yet not shaped as modnets writes
            run, reason = None, ("malformed", f"{type(e).__name__}: {e}")
        if run is not None and run["id"] in seen:
            run, reason = None, ("duplicate", f"same config hash and seed as {seen[run['id']]}; counted once")
        if run is None:
            failures.append({"path": str(path), "status": reason[0], "error": reason[1]})
            continue
        seen[run["id"]] = str(path)
        runs.append(run)
    return runs, failures


def read_run(path: Path):
    """(run, None) for a sound completed run, else (None, (status, why))."""
    result = json.loads(path.read_text())
    bad = problem(result)
    if bad:
        return None, ("rejected", bad)
    status = result.get("status", "unknown")
    if status != "completed":
        error = result.get("error") or result.get("message") or ""
        return None, (status, str(error).splitlines()[0] if error else "")
    selected = result.get("selection")  # selected/results.json: one run of "best of R" (modnets.selection)
    kept = lambda k: not ignored(k) or (selected and k == "trainer.replicates")  # noqa: E731 (population size)
    config = {k: v for k, v in flatten(result.get("config", {})).items() if kept(k)}
    history = result.get("history") or []
    curve = (np.array([h["epoch"] for h in history]), np.array([h.get("heldout_acc", np.nan) for h in history], dtype=float))
    metrics = metrics_of(result)
    numbers = [*metrics.items(), *(("history", v) for h in history for v in h.values() if isinstance(v, float))]
    nonfinite = sorted({k for k, v in numbers if not math.isfinite(v)})
    if nonfinite:
        return None, ("non-finite", f"NaN or inf in {', '.join(nonfinite)}")
    seed = result.get("config", {}).get("seed")
    run = {
        "key": json.dumps(config, sort_keys=True, default=str),
        "id": (result.get("config_hash"), seed),
        "config": config,
        "metrics": metrics,
        "curve": curve,
        "seed": seed,
        "arch": arch_label(result.get("config", {})) + (f", best of {len(selected['among'])}" if selected else ""),
        "path": str(path),
    }
    return run, None


def t_quantile(n: int) -> float:
    """The 97.5% quantile of Student's t with n - 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def stats(values: list[float]) -> tuple[float, float, float]:
    """mean, sample std and 95% CI half-width (NaN where undefined)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan
    std = float(x.std(ddof=1))
    return mean, std, t_quantile(n) * std / math.sqrt(n)


def summarise(runs: list[dict]) -> tuple[list[dict], list[str], list[str]]:
    """One row per configuration; returns rows, the varying config keys and the metric names."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["key"]].append(r)
    configs = [g[0]["config"] for g in groups.values()]
    keys = sorted({k for c in configs for k in c})
    varying = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]
    metric_names = sorted({m for r in runs for m in r["metrics"]})
    rows = []
    for group in groups.values():
        row = {
            k: json.dumps(group[0]["config"].get(k), default=str)
            if isinstance(group[0]["config"].get(k), list)
            else group[0]["config"].get(k)
            for k in varying
        }
        row |= {"arch": group[0]["arch"], "n": len(group), "seeds": " ".join(str(r["seed"]) for r in sorted(group, key=seed_key))}
        for m in metric_names:
            values = [r["metrics"][m] for r in group if isinstance(r["metrics"].get(m), (int, float))]
            if values:
                row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_ci95"] = stats(values)
        row["_runs"] = group
        rows.append(row)
    rows.sort(key=lambda r: [str(r.get(k)) for k in varying] + [r["arch"]])
    return rows, varying, metric_names


def seed_key(run: dict):
    return run["seed"] if isinstance(run["seed"], int) else 0


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in columns})


def arch_rank(arch: str):
    return (ARCH_ORDER.index(arch) if arch in ARCH_ORDER else len(ARCH_ORDER), arch)


def facets(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by depth (task.modularity), in order of depth."""
    by = defaultdict(list)
    for r in rows:
        by[str(r.get("task.modularity", r["_runs"][0]["config"].get("task.modularity", "")))].append(r)
    return dict(sorted(by.items(), key=lambda kv: (len(kv[0]), kv[0])))


def fraction(row: dict) -> float:
    return float(row["_runs"][0]["config"].get("task.train_fraction", math.nan))


def save(fig, path: Path) -> None:
    """A small PNG: 80 dpi, and 64 colours with Pillow (a core dependency)."""
    fig.savefig(path, dpi=80)
    try:
        from PIL import Image

        Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)
    except ImportError:
        pass


def plot(rows: list[dict], out: Path, curve_fraction: float | None) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        print("aggregate: no figures: matplotlib is missing (pip install 'modnets[sweeps]', or --no-plots)", file=sys.stderr)
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_depth = facets(rows)
    n = len(by_depth)
    colours = dict(zip(ARCH_ORDER, ["black", "tab:blue", "tab:cyan", "tab:red", "tab:orange"]))

    def lines(ax, items, metric, style="-", label_suffix="", arch_filter=None):
        by_arch = defaultdict(list)
        for r in items:
            by_arch[r["arch"]].append(r)
        for arch in sorted(by_arch, key=arch_rank):
            if arch_filter and not arch_filter(arch):
                continue
            pts = sorted((fraction(r), r.get(f"{metric}_mean"), r.get(f"{metric}_ci95")) for r in by_arch[arch])
            pts = [p for p in pts if p[1] is not None]
            if not pts:
                continue
            x, y, ci = (np.array(v, dtype=float) for v in zip(*pts))
            ax.plot(x, y, style, marker="o", ms=3, color=colours.get(arch), label=arch + label_suffix)
            ax.fill_between(x, y - np.nan_to_num(ci), y + np.nan_to_num(ci), color=colours.get(arch), alpha=0.12)

    # held-out accuracy against the training fraction
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.4), squeeze=False, sharey=True)
    for ax, (depth, items) in zip(axes[0], by_depth.items()):
        lines(ax, items, "final.heldout_acc")
        ax.set(title=f"task {depth}", xlabel="training fraction", ylim=(0.4, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out bit accuracy (mean ± 95% CI)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    written.append(out / "heldout_vs_fraction.png")
    save(fig, written[-1])
    plt.close(fig)

    # learning curves at one training fraction
    fractions = sorted({fraction(r) for r in rows})
    f0 = min(fractions, key=lambda f: abs(f - (curve_fraction if curve_fraction is not None else 0.5)))
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.4), squeeze=False, sharey=True)
    for ax, (depth, items) in zip(axes[0], by_depth.items()):
        for r in sorted((r for r in items if fraction(r) == f0 or math.isnan(f0)), key=lambda r: arch_rank(r["arch"])):
            curves = [run["curve"] for run in r["_runs"]]
            length = min(len(c[0]) for c in curves)
            if length == 0:
                continue
            ys = np.stack([c[1][:length] for c in curves])
            mean = ys.mean(0)
            ax.plot(curves[0][0][:length], mean, color=colours.get(r["arch"]), label=r["arch"], lw=1.2)
            if len(ys) > 1:
                half = t_quantile(len(ys)) * ys.std(0, ddof=1) / math.sqrt(len(ys))
                ax.fill_between(curves[0][0][:length], mean - half, mean + half, color=colours.get(r["arch"]), alpha=0.12)
        ax.set(title=f"task {depth}, training fraction {f0:g}", xlabel="epoch", ylim=(0.4, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out bit accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    written.append(out / "learning_curves.png")
    save(fig, written[-1])
    plt.close(fig)

    # structure recovery of the learned-routing models, with the random-router baseline
    if any("recovery.input_routing_mean" in r for r in rows):
        names = [
            m for m in ("input_routing", "slot_assignment", "specialisation") if any(f"recovery.{m}_mean" in r for r in rows)
        ]
        fig, axes = plt.subplots(len(names), n, figsize=(4 * n, 2.8 * len(names)), squeeze=False, sharey=True)
        for i, name in enumerate(names):
            for ax, (depth, items) in zip(axes[i], by_depth.items()):
                lines(ax, items, f"recovery.{name}", arch_filter=lambda a: "known" not in a)
                lines(
                    ax,
                    [r for r in items if "known" not in r["arch"]],
                    f"recovery.random.{name}",
                    style=":",
                    label_suffix=" (random router)",
                )
                ax.set(title=f"{name.replace('_', ' ')}, task {depth}", xlabel="training fraction", ylim=(-0.02, 1.02))
                ax.grid(alpha=0.3)
            axes[i][0].set_ylabel("fraction recovered")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "recovery.png")
        save(fig, written[-1])
        plt.close(fig)
    return written


def sweep_group(paths: list[Path], fallback: str) -> tuple[str, str]:
    """The W&B group and project the training runs logged to (the most common), else `fallback`."""
    groups, projects = defaultdict(int), defaultdict(int)
    for path in paths:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        groups[result.get("wandb_group") or fallback] += 1
        projects[((result.get("config") or {}).get("logger") or {}).get("project") or "modnets"] += 1
    pick = lambda counts, default: max(counts, key=counts.get) if counts else default  # noqa: E731
    return pick(groups, fallback), pick(projects, "modnets")


def log_to_wandb(rows: list[dict], columns: list[str], figures: list[Path], paths: list[Path], args) -> str | None:
    """One W&B run (job_type=aggregate) with the summary table and the figures; returns its folder."""
    from modnets.logger import WandbLogger

    group, project = sweep_group(paths, str(args.dirs[0]))
    out = Path(args.out or Path(args.dirs[0]) / "aggregate")
    logger = WandbLogger(mode=args.wandb_mode, project=project, job_type="aggregate")
    config = {"dirs": [str(d) for d in args.dirs], "configurations": len(rows)}
    run = logger.start(config, "aggregate", str(out), group, ["aggregate"])
    data = [[r.get(c) if not isinstance(r.get(c), float) or math.isfinite(r[c]) else None for c in columns] for r in rows]
    run.log_table("summary", columns, data, step=0)
    for figure in figures:
        run.log_image(figure.stem, figure, step=0)
    run.finish()
    logger.close()  # W&B works in its own process: wait until the run is written
    return getattr(run, "directory", None) and str(out / "wandb")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="multirun folders (or any folders holding results.json files)")
    p.add_argument("--out", help="output folder (default: DIR/aggregate for the first DIR)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write the CSV files only")
    p.add_argument("--curve-fraction", type=float, default=None, help="training fraction of the learning curves (default 0.5)")
    p.add_argument("--metric", default="final.heldout_acc", help="metric printed in the table (default final.heldout_acc)")
    p.add_argument("--wandb", action="store_true", help="log the summary table and figures to a W&B run (job_type=aggregate)")
    p.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"], help="default offline")
    args = p.parse_args(argv)
    start = time.time()
    missing = [d for d in args.dirs if not Path(d).is_dir()]
    if missing:
        print(f"aggregate: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    paths = find_results(args.dirs)
    runs, failures = load(paths)
    out = Path(args.out or Path(args.dirs[0]) / "aggregate")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "failures.csv", failures, ["path", "status", "error"])
    print(f"read {len(paths)} results files in {time.time() - start:.2f} s: {len(runs)} completed, {len(failures)} not")
    for f in failures:
        print(f"  {f['status']}: {f['path']}: {f['error']}")
    if not runs:
        print("aggregate: no completed runs", file=sys.stderr)
        return 1
    rows, varying, metric_names = summarise(runs)
    stat_cols = [f"{m}_{s}" for m in metric_names for s in ("mean", "std", "ci95")]
    columns = [*varying, "arch", "n", "seeds", *stat_cols]
    write_csv(out / "summary.csv", rows, columns)
    run_rows = [
        {**{k: r["config"].get(k) for k in varying}, "arch": r["arch"], "seed": r["seed"], "path": r["path"], **r["metrics"]}
        for r in runs
    ]
    write_csv(out / "runs.csv", run_rows, [*varying, "arch", "seed", "path", *metric_names])
    m = args.metric
    print(f"{len(rows)} configurations; {m}: mean ± 95% CI over seeds")
    for row in rows:
        label = "  ".join(
            f"{k.split('.')[-1]}={row.get(k)}" for k in varying if not k.startswith(("model.", "router.", "optimizer."))
        )
        mean, ci = row.get(f"{m}_mean", math.nan), row.get(f"{m}_ci95", math.nan)
        print(f"  {label:<48} {row['arch']:<16} n={row['n']:<3} {mean:.3f} ± {ci:.3f}")
    figures = plot(rows, out, args.curve_fraction) if args.plots else []
    for path in figures:
        print(f"wrote {path}")
    if args.wandb:
        where = log_to_wandb(rows, columns, figures, paths, args)
        print(f"W&B run (job_type=aggregate, {args.wandb_mode}){f' in {where}' if where else ''}")
    print(f"wrote {out / 'summary.csv'}, runs.csv, failures.csv in {time.time() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
