"""Side by side: this checkout against another one, end to end, alternating A B A B.

    git worktree add --detach /tmp/base c9c7ffe
    python scripts/bench_ab.py /tmp/base --replicates 1 --mode offline --pairs 5

Each round runs `python -m modnets.train experiment=modular` in both checkouts with this
interpreter (the same packages), so that a machine's speed, which drifts from session to
session and minute to minute, cancels out of the comparison. Prints the medians of the wall time,
the training time and the time inside the run (`results.json`'s `train_time_s`, `wall_time_s`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench import cli_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="the other checkout (a worktree of another commit)")
    parser.add_argument("--replicates", type=int, default=1)
    parser.add_argument("--mode", default="offline", choices=["offline", "disabled"], help="logger.mode")
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    os.environ.pop("OMP_NUM_THREADS", None)  # each version's own thread default
    trees = {"base": args.base.resolve(), "this": ROOT}
    runs = {name: [] for name in trees}
    for _ in range(args.pairs):
        for name, tree in trees.items():
            r = cli_run(args.replicates, args.mode, threads=None, tree=tree)
            runs[name].append((r["wall"], r["train"], r["inside"]))
    load = os.getloadavg()[0]
    print(f"experiment=modular, R={args.replicates}, W&B {args.mode}, medians of {args.pairs} pairs, load {load:.1f}")
    print(f"{'':<6} {'wall s':>8} {'training s':>11} {'inside run s':>13}")
    for name, values in runs.items():
        wall, train, inside = (statistics.median(v[i] for v in values) for i in range(3))
        print(f"{name:<6} {wall:>8.2f} {train:>11.2f} {inside:>13.2f}")


if __name__ == "__main__":
    main()
