"""The router-method table of docs/routing.md: every method on [6,3,2,2] at two training fractions.

    python scripts/routing_table.py                     # the table in the docs (32 seeds per cell)
    python scripts/routing_table.py --seeds 8 --fractions 0.8 --methods learned soft

Each cell is one batched run (`trainer.replicates=SEEDS`, seeds 0..SEEDS-1) of `experiment=modular`
with `router=METHOD` (plus the method's extra overrides below); it prints a markdown table of mean
held-out bit accuracy, the rate of exact structure recovery, mean sub-function recovery, and for
soft methods the mean discretisation gap (soft minus hard held-out accuracy at the end of training).
Results go to multirun/routing_table/<method>/f<fraction>/seed_*/results.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Rows of the table: label -> overrides on top of experiment=modular.
METHODS = {
    "learned": ["router=learned"],
    "learned + regularisers": ["router=learned", "router.entropy=0.01", "router.duplicate=0.1"],
    "gumbel": ["router=gumbel"],
    "gumbel annealed": ["router=gumbel", "router.tau=2.0", "router.tau_end=0.1"],
    "soft": ["router=soft"],
    "soft 300 epochs": ["router=soft", "trainer.epochs=300"],
    "soft 300 + duplicate": ["router=soft", "trainer.epochs=300", "router.duplicate=0.1"],
    "soft 300 + entropy": ["router=soft", "trainer.epochs=300", "router.entropy=0.001"],
    "sampling": ["router=sampling"],
}


def cell(method: str, fraction: float, seeds: int, out: Path) -> dict[str, float]:
    from hydra import compose, initialize_config_dir

    from modnets.train import run

    overrides = [
        "experiment=modular", "task=bool_6_3_2_2", f"task.train_fraction={fraction}", *METHODS[method],
        f"trainer.replicates={seeds}", "seed=0", "trainer.eval_every=50", "trainer.progress=false",
        "trainer.threads=1", "logger.mode=disabled", f"output_dir={out}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    start = time.time()
    results = [r for r in run(cfg) if r["status"] == "completed"]
    rec = [r["recovery"] for r in results]
    row = {
        "heldout": statistics.mean(r["final"]["heldout_acc"] for r in results),
        "exact": statistics.mean(m["exact_structure"] for m in rec),
        "sub_functions": statistics.mean(m["sub_functions"] for m in rec),
        "n": len(results),
        "seconds": time.time() - start,
    }
    if "discretisation_gap_heldout" in rec[0]:
        row["gap"] = statistics.mean(m["discretisation_gap_heldout"] for m in rec)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.8, 0.5])
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "multirun" / "routing_table")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    heads = " | ".join(f"f={f}: held-out / exact / sub-fn" for f in args.fractions)
    print(f"| method | {heads} | gap (soft - hard) |")
    print("|---|" + "---|" * (len(args.fractions) + 1))
    for method in args.methods:
        rows = [cell(method, f, args.seeds, args.out / method.replace(" ", "_") / f"f{f}") for f in args.fractions]
        cells = " | ".join(f"{r['heldout']:.3f} / {r['exact'] * r['n']:.0f} of {r['n']} / {r['sub_functions']:.2f}" for r in rows)
        gaps = ", ".join(f"{r['gap']:+.3f}" for r in rows if "gap" in r) or "–"
        print(f"| {method} | {cells} | {gaps} |", flush=True)
        seconds = ", ".join(f"{r['seconds']:.0f}" for r in rows)
        print(f"  ({method}: {seconds} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
