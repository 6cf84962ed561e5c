"""Benchmark: what circuit pictures cost a run, `logger.pictures=true` against `false`.

    python scripts/bench_pictures.py                      # the default run, 5 pairs
    python scripts/bench_pictures.py --pairs 7 -- experiment=shared trainer.replicates=8

Each pair runs the same `modnets-train` command (W&B offline, as by default) twice, once with
pictures and once without, in alternating order, and takes each command's wall time end to end
(interpreter start to exit) and CPU time (user + system of the command and its W&B process:
steadier than wall time on a shared machine). Prints the medians and their ratios, and the time of one drawing
(`modnets.draw.draw` on the results file of the last run, median of 5).
"""

from __future__ import annotations

import argparse
import json
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


def timed(overrides: list[str], pictures: bool, out: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the run and its W&B process) of one command."""
    cmd = [sys.executable, "-m", "modnets.train", *overrides, f"logger.pictures={str(pictures).lower()}", f"output_dir={out}"]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_SILENT": "true"})
    took, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"bench_pictures: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return took, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("overrides", nargs="*", help="modnets-train overrides (after --)")
    args = p.parse_args(argv)
    times, cpu = {True: [], False: []}, {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for pictures in ((True, False) if i % 2 == 0 else (False, True)):
                took, used = timed(args.overrides, pictures, Path(tmp) / f"{i}-{pictures}")
                times[pictures].append(took)
                cpu[pictures].append(used)
        from modnets import draw

        result = json.loads((Path(tmp) / f"{args.pairs - 1}-True" / "results.json").read_text())
        picture = draw.picture_of(result)
        drawing = []
        for _ in range(5 if picture else 0):
            start = time.perf_counter()
            draw.draw(picture, Path(tmp) / "bench.png")
            drawing.append(time.perf_counter() - start)
    print(f"command: modnets-train {' '.join(args.overrides) or '(defaults)'}, {args.pairs} pairs, medians")
    for name, values in (("wall", times), ("cpu", cpu)):
        on, off = statistics.median(values[True]), statistics.median(values[False])
        print(f"  {name:<4} pictures=true  {on:7.2f} s   (all: {' '.join(f'{t:.2f}' for t in values[True])})")
        print(f"  {name:<4} pictures=false {off:7.2f} s   (all: {' '.join(f'{t:.2f}' for t in values[False])})")
        print(f"  {name:<4} ratio {on / off:.3f} ({100 * (on / off - 1):+.1f}%)")
    if drawing:
        print(f"  one drawing: {1000 * statistics.median(drawing):.0f} ms (median of 5, Pillow already imported)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
