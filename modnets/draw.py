"""Circuit pictures: the learned network beside the task's true circuit (`circuit.png`).

Everything a picture needs is in a run's results.json, so `scripts/draw_circuit.py` draws any
results file the way the trainer does:

- `circuits`: the task's true circuits (`circuit_json`), one per task of a multi-task set;
- `routing`: the noise-free routing, `inputs[layer][task][module]`, `outputs[task]` and, for
  shared models, `locations[layer][task][slot]`;
- `modules`: every trained module's outputs on its 2^k binary inputs (`k`, `tables` per layer,
  or one library for shared models), the gate each table computes (`gates`, "?" for none) and
  the network's number of inputs (`n_inputs`).

Learned modules are matched to true ones layer by layer exactly as `modnets.recovery` matches
them, and drawn at the place of their true module. Marked in red: wires from a wrong unit, modules
whose table does not compute the true gate (either polarity, as `recovery.separates`), slots of a
shared model using the wrong library module (after the best relabelling of the library) and
outputs read from the wrong module. matplotlib (Agg, no pyplot) is imported only when drawing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from modnets import recovery
from modnets.circuits import Circuit, Gate, default_gates, joint_library

OK, WRONG, SPARE = "#2b8a3e", "#d6336c", "#adb5bd"  # correct, wrong, a module with no true counterpart
EXTRA_HINT = "pip install 'modnets[sweeps]' (matplotlib)"
_missing_warned = False


def available() -> bool:
    """matplotlib is importable; warns once (one line naming the extra) when it is not."""
    global _missing_warned
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not _missing_warned:
            print(f"modnets: warning: circuit pictures need matplotlib: {EXTRA_HINT}; no circuit.png", file=sys.stderr)
            _missing_warned = True
        return False
    return True


# ---------------------------------------------------------------------------------------------
# What results.json holds for a picture


def circuit_json(c: Circuit) -> dict:
    layers = [[{"op": g.op, "inputs": list(g.inputs)} for g in layer] for layer in c.layers]
    return {"n_inputs": c.n_inputs, "outputs": list(c.outputs), "layers": layers}


def circuit_from_json(d: dict) -> Circuit:
    layers = tuple(tuple(Gate(g["op"], tuple(g["inputs"])) for g in layer) for layer in d["layers"])
    return Circuit(int(d["n_inputs"]), layers, tuple(d["outputs"]))


def gate_names(k: int, circuits: list[Circuit] | None) -> list[str]:
    """Candidate gate names of a k-input module: the task's gates first, then the generator's library."""
    own = [op for c in circuits or [] for op in c.library if all(len(g.inputs) == k for layer in c.layers for g in layer)]
    return list(dict.fromkeys([*own, *default_gates(k)]))


def gate_of(outputs, k: int, names: list[str]) -> str:
    """The gate whose truth table the outputs on {0,1}^k separate with the widest margin (the gap
    between its 1-rows and 0-rows over the outputs' range), high = 1, or high = 0 as "¬gate" when
    the library has no complement; "?" when no gate is separated (constant or tangled outputs)."""
    out = np.asarray(outputs, dtype=float)
    spread_ = float(np.ptp(out)) if np.isfinite(out).all() else 0.0
    best, label = 0.0, "?"
    for sign, prefix in ((1, ""), (-1, "¬")):
        for name in names:
            bits = recovery.gate_table(name, k)
            if 0 < bits.sum() < len(bits) and spread_ > 0:
                ones, zeros = out[bits == 1], out[bits == 0]
                margin = ones.min() - zeros.max() if sign > 0 else zeros.min() - ones.max()
                if margin / spread_ > best + 1e-9:
                    best, label = margin / spread_, prefix + name
    return label


def has_modules(model) -> bool:
    """A model with routed banks of k-input modules (ModularNet; not MLP, CNN or image models)."""
    return hasattr(model, "routers") and (hasattr(model, "banks") or hasattr(model, "bank"))


def modules_json(model, circuits: list[Circuit] | None) -> list[dict] | None:
    """Per replicate: every module's outputs on {0,1}^k (3 decimals) and the gate it computes.
    None for a model without routed module banks."""
    if not has_modules(model):
        return None
    k, n_inputs = int(model.routers[0].k), int(model.routers[0].logits.shape[2])
    names = gate_names(k, circuits)
    out = []
    for banks in recovery.module_tables(model):
        gates = [[gate_of(row, k, names) for row in b] for b in banks]
        finite = [np.where(np.isfinite(b), np.round(b.astype(float), 3), None) for b in banks]  # NaN (diverged): null
        tables = [b.tolist() for b in finite]
        out.append({"k": k, "n_inputs": n_inputs, "tables": tables, "gates": gates})
    return out


def picture_of(result: dict) -> dict | None:
    """The parts of a results dict a picture needs (None when the run has no routed modules)."""
    routing, modules = result.get("routing") or {}, result.get("modules")
    if "inputs" not in routing or not modules:
        return None
    config = result.get("config") or {}
    circuits = [circuit_from_json(c) for c in result.get("circuits") or []] or None
    read = 1 + max(a for layer in routing["inputs"][0] for m in layer for a in m)
    return {
        "routing": routing,
        "modules": modules,
        "n_inputs": modules.get("n_inputs") or (circuits[0].n_inputs if circuits else read),
        "circuits": circuits,
        "skip_output": bool((config.get("model") or {}).get("skip_output", False)),
        "title": title(config),
    }


def title(config: dict) -> str:
    """`shared model, learned routing; task BooleanTask [6, 3, 2, 2]; seed 0` from a resolved config."""
    model, router, task = (config.get(k) or {} for k in ("model", "router", "task"))
    kind = "shared" if model.get("shared") else "modular"
    known = [k.removeprefix("known_") for k in ("known_inputs", "known_outputs", "known_locations") if router.get(k)]
    shape = task.get("modularity") or task.get("tasks") or task.get("widths") or task.get("n_inputs")
    name = str(task.get("_target_", "task")).rsplit(".", 1)[-1]
    routing = f"known {', '.join(known)}" if known else "learned"
    return f"{kind} model, {routing} routing;  task {name} {shape if shape is not None else ''};  seed {config.get('seed', '?')}"


# ---------------------------------------------------------------------------------------------
# Marks: which learned wire, module and output is right


def comparable(p: dict) -> bool:
    """The learned network can be held against the true circuits: same inputs, depth and arity."""
    cs, r = p["circuits"], p["routing"]
    if not cs:
        return False
    try:
        arity = {c.arity for c in cs}
    except ValueError:
        return False
    n_in = max((a for layer in r["inputs"][0] for m in layer for a in m), default=-1) < cs[0].n_inputs
    return arity == {p["modules"]["k"]} and all(len(c.layers) == len(r["inputs"]) for c in cs) and n_in


def library_relabelling(p: dict, perms_per_task: list) -> dict[int, int]:
    """Shared models: learned library module -> true gate (index into the task set's library),
    the relabelling that makes most matched slots right (as `recovery.slot_assignment`)."""
    library = joint_library(p["circuits"])[0]
    pairs = [
        (p["routing"]["locations"][i][t][j], library.index(c.layers[i][tr].op))
        for t, (c, perms) in enumerate(zip(p["circuits"], perms_per_task))
        for i, perm in enumerate(perms)
        for j, tr in enumerate(perm)
        if tr >= 0
    ]
    if not pairs:
        return {}
    counts = np.zeros((max(a for a, _ in pairs) + 1, len(library)))
    for a, b in pairs:
        counts[a, b] += 1
    from scipy.optimize import linear_sum_assignment  # here: importing scipy costs a third of a second

    rows, cols = linear_sum_assignment(counts, maximize=True)
    return dict(zip(rows.tolist(), cols.tolist()))


def module_mark(p: dict, t: int, i: int, j: int, true: Gate | None, prev, relabel) -> dict:
    """Learned module j of layer i in task t: its label and, against its true module `true`
    (None: unmatched or nothing to compare), its state and the marks of its input wires."""
    inputs = p["routing"]["inputs"][i][t][j]
    loc = p["routing"]["locations"][i][t][j] if "locations" in p["routing"] else None
    bank, row = (0, loc) if loc is not None else (i, j)
    table, label = p["modules"]["tables"][bank][row], p["modules"]["gates"][bank][row]
    m = {"inputs": inputs, "table": table, "gate": label, "label": label, "loc": loc, "state": None, "misplaced": False}
    m["wires"] = [None] * len(inputs)
    if true is None:
        return m
    gate_ok = recovery.separates(np.asarray(table, dtype=float), recovery.gate_table(true.op, len(true.inputs)))
    m["misplaced"] = loc is not None and relabel.get(loc) != joint_library(p["circuits"])[0].index(true.op)
    m["label"] = true.op if gate_ok else label
    m["state"] = "ok" if gate_ok and not m["misplaced"] else "wrong"
    m["wires"] = [(int(prev[a]) if prev is not None else int(a)) in true.inputs for a in inputs]
    return m


def task_marks(p: dict, t: int, perms, relabel: dict[int, int] | None) -> dict:
    """Task t: per layer, each learned module's `place` (the row of its true module; unmatched
    modules below), label and marks; the output picks and their marks. perms None: no truth."""
    c, r = p["circuits"][t] if perms is not None else None, p["routing"]
    layers = []
    for i, ins in enumerate(layer[t] for layer in r["inputs"]):
        perm = perms[i] if perms is not None else [-1] * len(ins)
        spare = iter(range(len(c.layers[i]) if c else 0, 10**9))
        layer = []
        for j, tr in enumerate(perm):
            m = module_mark(p, t, i, j, c.layers[i][tr] if c and tr >= 0 else None, perms[i - 1] if c and i else None, relabel)
            m["place"] = int(tr) if tr >= 0 else next(spare)
            m["state"] = m["state"] or ("spare" if c else None)
            layer.append(m)
        layers.append(layer)
    outputs = r["outputs"][t]
    marks = [None] * len(outputs)
    if perms is not None:  # the units the output router reads, as (layer, true module) pairs
        readable = [(i, int(x)) for i, perm in enumerate(perms) if p["skip_output"] or i == len(perms) - 1 for x in perm]
        marks = [o < len(readable) and readable[o] == (len(perms) - 1, want) for o, want in zip(outputs, c.outputs)]
    return {"layers": layers, "outputs": outputs, "output_marks": marks}


def marks(p: dict) -> list[dict]:
    """task_marks of every task (no marks when the learned network cannot be compared)."""
    r = p["routing"]
    n_tasks = len(r["outputs"])
    if not comparable(p):
        return [task_marks(p | {"circuits": None}, t, None, None) for t in range(n_tasks)]
    perms = [recovery.match_layers([layer[t] for layer in r["inputs"]], c.routing)[0] for t, c in enumerate(p["circuits"])]
    relabel = library_relabelling(p, perms) if "locations" in r else None
    return [task_marks(p, t, perms[t], relabel) for t in range(n_tasks)]


# ---------------------------------------------------------------------------------------------
# Drawing: columns of units (inputs, one column per layer, outputs) joined by wires

ROW_IN, COL_IN, BOX_W, BOX_H = 0.32, 0.95, 0.62, 0.62  # inches per row and column; box size in column / row units


def ys(n: int) -> list[float]:
    """Heights of n units of a column, top first, centred on 0."""
    return [(n - 1) / 2 - i for i in range(n)]


def learned_panel(t_marks: dict, n_inputs: int, heights: list[int], skip_output: bool):
    """Boxes and wires (with their marks) of the learned network of one task."""
    boxes, wires, readable = [], [], []
    prev_y = ys(n_inputs)
    for i, layer in enumerate(t_marks["layers"]):
        y = [ys(heights[i])[m["place"]] for m in layer]  # learned module j -> its height
        for m, yj in zip(layer, y):
            colour = {"ok": OK, "wrong": WRONG, "spare": SPARE, None: "#495057"}[m["state"]]
            sub = None if m["loc"] is None else f"#{m['loc']}"
            boxes.append((i + 1, yj, m["label"], sub, colour, m.get("misplaced", False)))
            for q, (a, ok) in enumerate(zip(m["inputs"], m["wires"])):
                wires.append((i, prev_y[a], i + 1, yj + spread(q, len(m["inputs"])), ok))
        readable = readable + [(i + 1, yj) for yj in y] if skip_output else [(i + 1, yj) for yj in y]
        prev_y = y
    out_y, depth = ys(len(t_marks["outputs"])), len(t_marks["layers"])
    for o, (src, ok) in enumerate(zip(t_marks["outputs"], t_marks["output_marks"])):
        wires.append((*readable[src], depth + 1, out_y[o], ok))
    return boxes, wires


def spread(q: int, k: int) -> float:
    """Where input q of k enters a box, relative to its centre."""
    return 0.3 * BOX_H * (q - (k - 1) / 2) / max(1, (k - 1) / 2) if k > 1 else 0.0


def true_panel(c: Circuit, heights: list[int]):
    boxes, wires = [], []
    prev_y = ys(c.n_inputs)
    for i, layer in enumerate(c.layers):
        y = ys(heights[i])
        for j, g in enumerate(layer):
            boxes.append((i + 1, y[j], g.op, None, "#495057", False))
            for q, a in enumerate(g.inputs):
                wires.append((i, prev_y[a], i + 1, y[j] + spread(q, len(g.inputs)), None))
        prev_y = y
    out_y = ys(len(c.outputs))
    wires += [(len(c.layers), prev_y[src], len(c.layers) + 1, out_y[o], None) for o, src in enumerate(c.outputs)]
    return boxes, wires


WIRE_STYLES = {None: ("#868e96", "solid", 0.8), True: ("#495057", "solid", 0.9), False: (WRONG, (0, (3, 2)), 1.3)}
PANEL_W, TITLE_H = 2.4, 1.3  # panel width beyond its layer columns, room above a panel's rows (data units)


class Canvas:
    """Every panel's wires, boxes, dots and labels, collected in data units (columns 1 apart,
    rows 1 apart) and drawn on one Axes: a few collections, so that a picture draws fast."""

    def __init__(self):
        self.wires = {ok: [] for ok in WIRE_STYLES}
        self.boxes, self.edges, self.dots, self.squares, self.texts = [], [], [], [], []

    def panel(self, boxes, wires, shape: tuple[int, int, int], title: str, origin: tuple[float, float]) -> None:
        """One panel at origin: wires (grey; dark when right, dashed red when wrong), module
        boxes, input dots x0.. and output squares y0.. (red when read from the wrong module)."""
        (n_inputs, n_outputs, depth), (ox, oy), half = shape, origin, BOX_W / 2
        for x0, y0, x1, y1, ok in wires:
            start, end = x0 + (half if x0 > 0 else 0.08), x1 - (half if x1 <= depth else 0.08)
            self.wires[ok].append([(ox + start, oy + y0), (ox + end, oy + y1)])
        for x, y, label, sub, colour, misplaced in boxes:
            self.boxes.append((ox + x - half, oy + y - BOX_H / 2))
            self.edges.append(colour)
            ink = colour if label == "?" else "black"
            self.texts.append((ox + x, oy + y + (0.1 if sub else 0), label, dict(ha="center", fontsize=6.5, color=ink)))
            if sub:
                ink = WRONG if misplaced else "#495057"
                self.texts.append((ox + x, oy + y - 0.2, sub, dict(ha="center", fontsize=5, color=ink)))
        for i, y in enumerate(ys(n_inputs)):
            self.dots.append((ox, oy + y))
            self.texts.append((ox - 0.12, oy + y, f"x{i}", dict(ha="right", fontsize=6)))
        wrong = {y1 for x0, y0, x1, y1, ok in wires if x1 == depth + 1 and ok is False}
        for o, y in enumerate(ys(n_outputs)):
            colour = WRONG if y in wrong else "#343a40"
            self.squares.append((ox + depth + 1, oy + y, colour))
            self.texts.append((ox + depth + 1.12, oy + y, f"y{o}", dict(ha="left", fontsize=6, color=colour)))
        self.texts.append((ox + (depth + 1) / 2, oy + (max(n_inputs, 1) / 2) + 0.5, title, dict(ha="center", fontsize=7)))

    def render(self, ax) -> None:
        from matplotlib.collections import LineCollection, PatchCollection
        from matplotlib.patches import Rectangle

        for ok, (colour, dash, lw) in WIRE_STYLES.items():
            if self.wires[ok]:
                ax.add_collection(LineCollection(self.wires[ok], colors=colour, linestyles=dash, linewidths=lw, zorder=1))
        frames = [Rectangle(corner, BOX_W, BOX_H) for corner in self.boxes]
        ax.add_collection(PatchCollection(frames, facecolors="white", edgecolors=self.edges, linewidths=1.5, zorder=2))
        ax.scatter(*zip(*self.dots), s=9, color="#343a40", zorder=2)
        x, y, colours = zip(*self.squares)
        ax.scatter(x, y, s=12, marker="s", c=colours, zorder=2)
        for x, y, text, style in self.texts:
            ax.text(x, y, text, va="center", zorder=3, **style)


def score(t_marks: dict) -> str:
    mods = [m for layer in t_marks["layers"] for m in layer if m["state"] in ("ok", "wrong")]
    wires = [ok for m in mods for ok in m["wires"]]
    gates = sum(m["state"] == "ok" for m in mods)
    outs = t_marks["output_marks"]
    return f"wires {sum(wires)}/{len(wires)}, modules {gates}/{len(mods)}, outputs {sum(outs)}/{len(outs)}"


def column_heights(p: dict, task_marks_: list[dict], circuits) -> list[int]:
    """Rows of each module layer: the widest of the true layers and the learned places."""
    return [
        max([1 + max(m["place"] for m in tm["layers"][i]) for tm in task_marks_] + [len(c.layers[i]) for c in circuits or []])
        for i in range(len(p["routing"]["inputs"]))
    ]


def draw(p: dict, path, dpi: int = 80) -> Path:
    """Write the picture of `picture_of(result)` to path (PNG): per task, truth | learned.
    Rows are a fixed height in inches, so that wide circuits (16+ inputs) grow, not shrink."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    task_marks_ = marks(p)
    cs = p["circuits"] if comparable(p) else None
    depth, n_inputs, n_outputs = len(p["routing"]["inputs"]), p["n_inputs"], len(p["routing"]["outputs"][0])
    heights = column_heights(p, task_marks_, cs)
    rows, shape = max(n_inputs, *heights, n_outputs), (n_inputs, n_outputs, depth)
    width, height = depth + PANEL_W, rows + TITLE_H  # one panel, in data units
    canvas = Canvas()
    for t, tm in enumerate(task_marks_):
        task, top = f" (task {t})" if len(task_marks_) > 1 else "", -t * height
        if cs:
            canvas.panel(*true_panel(cs[t], heights), shape, f"true circuit{task}", (0, top))
        verdict = f": {score(tm)}" if cs else ", no true circuit to compare"
        learned = learned_panel(tm, n_inputs, heights, p["skip_output"])
        canvas.panel(*learned, shape, f"learned{task}{verdict}", (width if cs else 0, top))
    cols, n = 2 if cs else 1, len(task_marks_)
    fig = Figure(figsize=(cols * width * COL_IN, (n * height + 0.6) * ROW_IN))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    left, top = -0.75, rows / 2 + TITLE_H - 0.2 + 0.6
    ax.set(xlim=(left, left + cols * width), ylim=(top - n * height - 0.6, top))
    canvas.render(ax)
    ax.text(left + 0.1, top - 0.35, p.get("title", ""), fontsize=7.5, va="center", weight="bold")
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


# ---------------------------------------------------------------------------------------------
# The module table (W&B) and the pictures of a training run


def module_rows(p: dict) -> tuple[list[str], list[list]]:
    """The module table: one row per task and module slot (`L<layer>.<module>`): its library
    module (shared models), the units it reads, its outputs on {0,1}^k, its gate and its mark."""
    combos = " ".join("".join(map(str, row)) for row in recovery.binary_rows(p["modules"]["k"]))
    columns = ["task", "module", "library module", "inputs read", f"outputs on {combos}", "matched gate", "true gate", "mark"]
    rows = []
    for t, tm in enumerate(marks(p)):
        for i, layer in enumerate(tm["layers"]):
            for j, m in enumerate(layer):
                reads = ", ".join(f"x{a}" if i == 0 else f"L{i}.{a}" for a in m["inputs"])
                true = p["circuits"][t].layers[i][m["place"]].op if m["state"] in ("ok", "wrong") else ""
                outputs = " ".join("nan" if v is None else f"{v:.2f}" for v in m["table"])
                rows.append([t, f"L{i + 1}.{j}", m["loc"], reads, outputs, m["gate"], true, m["state"] or ""])
    return columns, rows


def drawn_content(p: dict) -> str:
    """Everything a picture shows (routing, labels and marks), not the module outputs behind them."""
    shown = [[{k: v for k, v in m.items() if k != "table"} for layer in tm["layers"] for m in layer] for tm in marks(p)]
    return repr((p["routing"], shown, [tm["output_marks"] for tm in marks(p)], p["title"]))


class Pictures:
    """`logger.pictures`: circuit.png in each run folder at the end, and the picture logged to the
    W&B run at checkpoints during training (the trainer calls `checkpoint` at every other recovery
    checkpoint; redrawn only when what it shows changed, else the last file is logged again) and
    at the end. Off (matplotlib never imported) when disabled, for models
    without routed modules and when matplotlib is missing (one warning). Only the first `limit`
    replicates of a run get pictures (`logger.max_pictures`: a picture costs about 65 ms, so 1024
    seeds would spend a minute drawing); `scripts/draw_circuit.py` draws any other from its results."""

    def __init__(self, enabled: bool, model, task, logs, limit: int = 16):
        self.circuits = [circuit_json(c) for c in task.circuits] if task.circuits else None
        self.dirs, self.runs, self.configs = logs.dirs, logs.runs, logs.configs
        self.on = bool(enabled) and has_modules(model) and available() and limit > 0
        self.pictured = set(self.dirs[: max(0, int(limit))])  # the run folders that get pictures
        self.drawn: dict[Path, str] = {}

    def checkpoint(self, model, task, epoch: int) -> None:
        if not self.on or not any(getattr(run, "live", False) for run in self.runs):
            return
        modules = modules_json(model, task.circuits)
        for d, run, routing, mods, config in zip(self.dirs, self.runs, model.routing_summary(), modules, self.configs):
            if getattr(run, "live", False) and d in self.pictured:
                result = {"routing": routing, "modules": mods, "circuits": self.circuits, "config": config}
                run.log_image("circuit", self.picture(result, d), step=epoch)

    def picture(self, result: dict, d: Path) -> Path:
        """d/circuit.png of this result, drawn unless the last one drawn there shows the same."""
        p = picture_of(result)
        key = drawn_content(p)
        path = d / "circuit.png"
        if self.drawn.get(d) != key or not path.exists():
            draw(p, path)
            self.drawn[d] = key
        return path

    def finish(self, result: dict, d: Path, run, step: int) -> None:
        """The final picture (circuit.png) and the module table of one replicate."""
        p = picture_of(result)
        if p is None:
            return
        if getattr(run, "live", False):
            columns, rows = module_rows(p)
            run.log_table("modules", columns, rows, step=step)
        if self.on and d in self.pictured:
            path = self.picture(result, d)
            run.log_image("circuit", path, step=step)
