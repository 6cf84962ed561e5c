"""Benchmark: training time of the original README's Boolean commands, with R replicates.

    python scripts/bench.py                          # all cases, R = 1, 8, 32, 128, plus the CLI
    python scripts/bench.py --replicates 1 32 --cases modular shared --device cuda
    python scripts/bench.py --out bench.json         # also write the table as JSON

"train" is the training loop of one process (forward, backward, optimizer, evaluation of
every split every epoch as the presets do), timed by `results.json`'s `train_time_s`.
"cli" is the whole `modnets-train experiment=...` command end to end (interpreter start,
Hydra, W&B offline run, results files). The original code's times for one run (2-core CPU)
are the reference: a seed sweep of R runs costs R times that.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--replicates", nargs="*", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="trainer.threads (default: the config's)")
    parser.add_argument("--repeats", type=int, default=1, help="best of N for each training timing")
    parser.add_argument("--cli-replicates", nargs="*", type=int, default=[1, 32], help="R for the end-to-end CLI timings")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()

    import torch

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
