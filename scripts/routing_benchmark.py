"""Structure-discovery benchmark: `python scripts/routing_benchmark.py [--no-run] [--cost] [DIR]`.

Runs `modnets-train experiment=routing_benchmark` into DIR (default multirun/routing_benchmark; a
relaunch runs only the missing cells), then rewrites the generated part of docs/discovery.md and
docs/discovery/benchmark.png: per task, training fraction and method, held-out bit accuracy (mean
and 95% CI), the share of runs with held-out accuracy 1, the exact-structure rate, training FLOPs
and the job's training time, for single runs and for the run selected by training loss in each
population of 32 (the same compute). `--cost` also times one `experiment=discover` run against one
`experiment=modular` run on [6, 3, 2, 2] (medians of three, alternating).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from modnets import selection

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("aggregate", ROOT / "scripts" / "aggregate.py")
aggregate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aggregate)

DOC, FIGURE = ROOT / "docs" / "discovery.md", ROOT / "docs" / "discovery" / "benchmark.png"
BEGIN, END = "<!-- routing_benchmark:begin -->", "<!-- routing_benchmark:end -->"
METHODS = ["mlp", "shared known", "modular learned", "modular gumbel", "modular soft", "modular soft wide", "modular sampling"]
TASKS = ["[6, 2, 2]", "[6, 3, 2, 2]", "[6, 3, 3, 2, 2]", "multitask", "random 16 in, depth 3", "random 9 in, arity 3"]


def train(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "modnets.train", *overrides], cwd=ROOT, env=env, text=True)


def task_label(config: dict) -> str:
    target = str(config.get("task._target_", ""))
    if target.endswith("MultiTask"):
        return "multitask"
    if target.endswith("RandomCircuitTask"):
        n, arity, depth = config.get("task.n_inputs"), config.get("task.arity"), config.get("task.depth")
        return f"random {n} in, arity {arity}" if arity != 2 else f"random {n} in, depth {depth}"
    return str(config.get("task.modularity")).replace(",", ", ").replace("  ", " ")


def cells(runs: list[dict]) -> dict[tuple, dict]:
    """(task, fraction, method, selected) -> {runs, heldout, ci, solved, exact, flops, time}."""
    out = defaultdict(list)
    for r in runs:
        selected = ", best of " in r["arch"]
        method = r["arch"].split(", best of ")[0]
        out[(task_label(r["config"]), r["config"].get("task.train_fraction"), method, selected)].append(r)
    table = {}
    for key, group in out.items():
        m = [r["metrics"] for r in group]
        heldout = [x["final.heldout_acc"] for x in m]
        mean, _, ci = aggregate.stats(heldout)
        exact = [x["recovery.exact_structure"] for x in m if "recovery.exact_structure" in x]
        flops = [x.get("flops.population_train" if key[3] else "flops.train", math.nan) for x in m]
        table[key] = {
            "n": len(group),
            "label": group[0]["arch"],
            "heldout": mean,
            "ci": ci,
            "solved": sum(h == 1.0 for h in heldout),
            "exact": sum(e == 1.0 for e in exact) if exact else None,
            "flops": statistics.median(flops),
            "time": statistics.median(x.get("train_time_s", math.nan) for x in m),
        }
    return table


def fmt_flops(f: float) -> str:
    return "–" if math.isnan(f) else f"{f:.2g}".replace("e+0", "e").replace("e+", "e")


def markdown(table: dict) -> str:
    """One table per task: rows method x (single, best of 32), columns per training fraction."""
    fractions = sorted({k[1] for k in table})
    lines = []
    for task in [t for t in TASKS if any(k[0] == t for k in table)]:
        lines += [f"**{task}**", ""]
        head = "| method | runs |" + "".join(f" held-out f={f} | =1 | exact |" for f in fractions) + " train FLOPs | job s |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for method in METHODS:
            for selected in (False, True):
                row = [table.get((task, f, method, selected)) for f in fractions]
                if not any(row):
                    continue
                first = next(c for c in row if c)
                text = f"| {first['label']} | {first['n']} |"
                for c in row:
                    if c is None:
                        text += " | | |"
                        continue
                    ci = "" if math.isnan(c["ci"]) else f" ± {c['ci']:.3f}"
                    exact = "–" if c["exact"] is None else f"{c['exact']}/{c['n']}"
                    text += f" {c['heldout']:.3f}{ci} | {c['solved']}/{c['n']} | {exact} |"
                lines.append(text + f" {fmt_flops(first['flops'])} | {first['time']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def best_of(runs: list[dict], cell: tuple, size: int) -> list[float]:
    """Held-out accuracy of the run modnets.selection.choose picks in each population of `size`
    consecutive seeds among the single runs of one (task, fraction, method) cell: what a
    population of `size` selects (experiment=discover_deep trains 64), from the same runs."""
    task, f, method = cell
    single = sorted((r for r in runs if r["arch"] == method and r["config"].get("task.train_fraction") == f
                     and task_label(r["config"]) == task), key=lambda r: r["seed"])
    picks = []
    for i in range(0, len(single) - size + 1, size):
        pop = single[i : i + size]
        chosen = selection.choose([r["seed"] for r in pop], [r["metrics"].get("final.train_loss") for r in pop])
        picks.append(next(r for r in pop if r["seed"] == chosen)["metrics"]["final.heldout_acc"])
    return picks


def targets(table: dict, runs: list[dict] = (), method: str = "modular soft") -> str:
    """The issue's targets, met or not, for the recipe's method (experiment=discover; on
    [6, 3, 3, 2, 2] also experiment=discover_deep, best of 64 of modular_soft_wide's single runs)."""
    def cell(task, f, selected, m=method):
        return table.get((task, f, m, selected))

    def check(ok) -> str:
        return "–" if ok is None else ("met" if ok else "**not met**")

    rows = []
    for f, bound in ((0.8, 0.99), (0.5, 0.97)):
        c = cell("[6, 3, 2, 2]", f, True)
        heldout = c and f"{c['heldout']:.3f}"
        rows.append((f"[6, 3, 2, 2], f = {f}: discover held-out ≥ {bound}", heldout, c and c["heldout"] >= bound))
        rows.append((f"[6, 3, 2, 2], f = {f}: exact circuit in ≥ 7 of 8 populations", c and f"{c['exact']}/{c['n']}",
                     c and c["exact"] >= 7 / 8 * c["n"]))
    c = cell("[6, 3, 3, 2, 2]", 0.8, True)
    rows.append(("[6, 3, 3, 2, 2], f = 0.8: discover held-out ≥ 0.95", c and f"{c['heldout']:.3f}", c and c["heldout"] >= 0.95))
    picks = best_of(list(runs), ("[6, 3, 3, 2, 2]", 0.8, f"{method} wide"), 64)
    mean = sum(picks) / len(picks) if picks else None
    value = f"{mean:.3f} ({len(picks)} populations of 64)" if picks else None
    rows.append(("[6, 3, 3, 2, 2], f = 0.8: discover_deep held-out ≥ 0.95", value, None if mean is None else mean >= 0.95))
    for selected in (True, False):
        c = cell("[6, 2, 2]", 0.8, selected)
        what = "discover" if selected else f"{method.split()[-1]} routing, single runs,"
        rows.append((f"[6, 2, 2], f = 0.8: {what} held-out ≥ 0.99", c and f"{c['heldout']:.3f}", c and c["heldout"] >= 0.99))
    singles = {m: cell("[6, 3, 2, 2]", 0.8, False, m) for m in METHODS}
    singles = {m: c for m, c in singles.items() if c and c["exact"] is not None and "known" not in m}
    if singles:
        best = max(singles, key=lambda m: singles[m]["exact"] / singles[m]["n"])
        c = singles[best]
        rows.append(("[6, 3, 2, 2], f = 0.8: one run finds the exact circuit in ≥ 16 of 32 seeds",
                     f"{c['exact'] / c['n'] * 32:.1f} of 32 ({best}, {c['exact']}/{c['n']})", c["exact"] / c["n"] >= 0.5))
    lines = ["| target | measured | |", "|---|---|---|"]
    lines += [f"| {name} | {value or '–'} | {check(ok)} |" for name, value, ok in rows]
    return "\n".join(lines) + "\n"


def figure(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(k[0] == t for k in table)]
    fractions = sorted({k[1] for k in table})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.1 * len(tasks), 3.6), squeeze=False, sharey=True)
    colours = ["tab:orange", "tab:blue", "tab:green"]
    for ax, task in zip(axes[0], tasks):
        for i, method in enumerate(METHODS):
            for j, f in enumerate(fractions):
                for selected, marker in ((False, "o"), (True, "*")):
                    c = table.get((task, f, method, selected))
                    if c is None:
                        continue
                    x = i + (j - (len(fractions) - 1) / 2) * 0.3 + (0.08 if selected else -0.08)
                    ax.errorbar(x, c["heldout"], yerr=0 if math.isnan(c["ci"]) else c["ci"], fmt=marker, ms=7 if selected else 4,
                                color=colours[j % 3], mfc=colours[j % 3] if selected else "white", capsize=2, lw=1)
        ax.set_xticks(range(len(METHODS)), [m.replace("modular ", "") for m in METHODS], rotation=60, fontsize=8)
        ax.set(title=task, ylim=(0.45, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out bit accuracy (mean ± 95% CI)")
    handles = [plt.Line2D([], [], color=colours[j % 3], marker="o", ls="", label=f"f = {f}") for j, f in enumerate(fractions)]
    handles += [plt.Line2D([], [], color="grey", marker="o", mfc="white", ls="", label="single run"),
                plt.Line2D([], [], color="grey", marker="*", ms=9, ls="", label="best of 32 by training loss")]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    aggregate.save(fig, path)
    plt.close(fig)


COSTED = {"modular": [], "discover": [], "discover_deep": ["task=bool_6_3_3_2_2"]}  # experiment -> overrides


def cost() -> str:
    """Training time of experiment=discover (32 seeds, batched) and experiment=discover_deep (64
    seeds, on [6, 3, 3, 2, 2]) against experiment=modular (one seed, [6, 3, 2, 2])."""
    times = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(3):
            for name, overrides in COSTED.items():
                out = Path(tmp) / f"{name}{i}"
                train(f"experiment={name}", *overrides, "logger.mode=disabled", "trainer.progress=false", "trainer.threads=1",
                      f"output_dir={out}")
                result = next(out.rglob("results.json"))
                times[name].append(json.loads(result.read_text())["train_time_s"])
    m, d, deep = (statistics.median(times[name]) for name in COSTED)
    return (f"training time, median of 3: experiment=modular {m:.1f} s, experiment=discover {d:.1f} s: ratio {d / m:.2f}; "
            f"experiment=discover_deep task=bool_6_3_3_2_2 {deep:.1f} s: ratio {deep / m:.2f}")


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", nargs="?", default="multirun/routing_benchmark", help="sweep folder")
    p.add_argument("--no-run", dest="run", action="store_false", help="only aggregate what is in DIR")
    p.add_argument("--cost", action="store_true", help="also time experiment=discover against experiment=modular")
    p.add_argument("--doc", action=argparse.BooleanOptionalAction, default=True, help="rewrite docs/discovery.md")
    args = p.parse_args(argv)
    folder = Path(args.dir) if Path(args.dir).is_absolute() else ROOT / args.dir
    sweep_time = None
    if args.run:
        start = time.time()
        proc = train("experiment=routing_benchmark", f"hydra.sweep.dir={folder}")
        sweep_time = time.time() - start
        if proc.returncode != 0:
            return proc.returncode
    runs, failures = aggregate.load(aggregate.find_results([str(folder)]))
    if failures:
        print(f"routing_benchmark: {len(failures)} runs did not complete, e.g. {failures[0]}", file=sys.stderr)
    table = cells(runs)
    text = markdown(table)
    lines = [f"Generated by `python scripts/routing_benchmark.py` from {len(runs)} results files."]
    if sweep_time is not None:
        lines.append(f"The sweep took {sweep_time / 60:.1f} minutes on {os.cpu_count()} CPU cores.")
    if args.cost:
        lines.append(cost() + ".")
    text = "\n".join(lines) + "\n\n" + targets(table, runs) + "\n" + text
    print(text)
    if args.doc and table:
        figure(table, FIGURE)
        write_doc(text + f"\n![held-out accuracy per method](discovery/{FIGURE.name})\n")
        print(f"wrote {DOC.relative_to(ROOT)} and {FIGURE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
