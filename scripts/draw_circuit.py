"""Draw the circuit picture of a run: `python scripts/draw_circuit.py RESULTS_JSON [--out PNG]`.

The learned network beside the task's true circuit, as the trainer writes it to circuit.png
(modnets.draw explains the marks). Default output: circuit.png beside the results file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from modnets import draw


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a results.json written by modnets-train")
    p.add_argument("--out", help="the PNG to write (default: circuit.png beside the results file)")
    p.add_argument("--dpi", type=int, default=draw.DPI, help=f"pixels per inch (default {draw.DPI})")
    args = p.parse_args(argv)
    try:
        result = json.loads(Path(args.results).read_text())
    except (OSError, ValueError) as e:
        print(f"draw_circuit: cannot read {args.results}: {e}", file=sys.stderr)
        return 2
    picture = draw.picture_of(result)
    if picture is None:
        why = "an MLP, CNN or image model, or a file from before pictures"
        print(f"draw_circuit: {args.results} has no routed modules to draw ({why})", file=sys.stderr)
        return 1
    if not draw.available():
        return 1
    out = draw.draw(picture, args.out or Path(args.results).with_name("circuit.png"), dpi=args.dpi)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
