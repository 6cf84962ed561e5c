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
outputs read from the wrong module.

The picture is laid out as a `Scene` (shapes in data units: `scene`) and rendered to PNG with
Pillow (`render`), imported only when drawing; matplotlib is not used here.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np

from modnets import recovery
from modnets.circuits import Circuit, Gate, default_gates, joint_library

OK, WRONG, SPARE = "#2b8a3e", "#d6336c", "#adb5bd"  # correct, wrong, a module with no true counterpart
INSTALL_HINT = "pip install pillow"  # a core dependency: missing only from a broken environment
_missing_warned = False


def available() -> bool:
    """Pillow is importable; warns once (one line naming the fix) when it is not."""
    global _missing_warned
    try:
        import PIL.ImageDraw  # noqa: F401
    except ImportError:
        if not _missing_warned:
            print(f"modnets: warning: circuit pictures need Pillow: {INSTALL_HINT}; no circuit.png", file=sys.stderr)
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
    return gates_of(np.asarray(outputs, dtype=float)[None], k, names)[0]


def gates_of(outputs: np.ndarray, k: int, names: list[str]) -> list[str]:
    """`gate_of` of many modules at once: outputs [modules, 2^k]."""
    out = np.asarray(outputs, dtype=float)
    finite = np.isfinite(out).all(1)
    spread_ = np.where(finite, np.ptp(np.where(finite[:, None], out, 0.0), 1), 0.0)
    scale = np.where(spread_ > 0, spread_, 1.0)
    best, label = np.zeros(len(out)), np.zeros(len(out), np.int64)  # label 0: "?"
    labels = ["?"]
    for sign, prefix in ((1, ""), (-1, "¬")):
        for name in names:
            bits = recovery.gate_table(name, k)
            if not 0 < bits.sum() < len(bits):
                continue
            ones, zeros = out[:, bits == 1], out[:, bits == 0]
            with np.errstate(invalid="ignore"):  # inf - inf in a diverged module's row: never a label
                margin = ones.min(1) - zeros.max(1) if sign > 0 else zeros.min(1) - ones.max(1)
            wider = (spread_ > 0) & (margin / scale > best + 1e-9)
            best = np.where(wider, margin / scale, best)
            label = np.where(wider, len(labels), label)
            labels.append(prefix + name)
    return [labels[i] for i in label.tolist()]


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
    banks = recovery.bank_tables(model)  # per layer (one library) [R, modules, 2^k]
    R = banks[0].shape[0]
    gates = [np.reshape(gates_of(b.reshape(-1, b.shape[2]), k, names), b.shape[:2]).tolist() for b in banks]
    tables = [rounded(b).tolist() for b in banks]
    return [{"k": k, "n_inputs": n_inputs, "tables": [t[r] for t in tables], "gates": [g[r] for g in gates]} for r in range(R)]


def rounded(table: np.ndarray) -> np.ndarray:
    """Module outputs to 3 decimals; NaN and inf (a diverged replicate) as None (JSON null)."""
    values = np.round(table.astype(float), 3)
    finite = np.isfinite(values)
    return values if finite.all() else np.where(finite, values, None)


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
    counts = np.zeros((1, max(a for a, _ in pairs) + 1, len(library)))
    for a, b in pairs:
        counts[0, a, b] += 1
    cols = recovery.assign(counts, maximize=True)[0].tolist()
    return {row: col for row, col in enumerate(cols) if col >= 0}


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
# Layout: columns of units (inputs, one column per layer, outputs) joined by wires, in data units
# (columns and rows 1 apart, y up). A Scene holds shapes only; `render` below turns it into pixels.

ROW_IN, COL_IN, BOX_W, BOX_H = 0.32, 0.95, 0.62, 0.76  # inches per row and column; box size in column / row units
PANEL_W, TITLE_H = 2.4, 1.3  # panel width beyond its layer columns, room above a panel's rows (data units)
INK, GREY, DARK = "#495057", "#868e96", "#343a40"


def ys(n: int) -> list[float]:
    """Heights of n units of a column, top first, centred on 0."""
    return [(n - 1) / 2 - i for i in range(n)]


def spread(q: int, k: int) -> float:
    """Where input q of k enters a box, relative to its centre."""
    return 0.3 * BOX_H * (q - (k - 1) / 2) / max(1, (k - 1) / 2) if k > 1 else 0.0


def learned_panel(t_marks: dict, n_inputs: int, heights: list[int], skip_output: bool):
    """Boxes and wires (with their marks) of the learned network of one task."""
    boxes, wires, readable = [], [], []
    prev_y = ys(n_inputs)
    for i, layer in enumerate(t_marks["layers"]):
        y = [ys(heights[i])[m["place"]] for m in layer]  # learned module j -> its height
        for m, yj in zip(layer, y):
            colour = {"ok": OK, "wrong": WRONG, "spare": SPARE, None: INK}[m["state"]]
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


def true_panel(c: Circuit, heights: list[int]):
    boxes, wires = [], []
    prev_y = ys(c.n_inputs)
    for i, layer in enumerate(c.layers):
        y = ys(heights[i])
        for j, g in enumerate(layer):
            boxes.append((i + 1, y[j], g.op, None, INK, False))
            for q, a in enumerate(g.inputs):
                wires.append((i, prev_y[a], i + 1, y[j] + spread(q, len(g.inputs)), None))
        prev_y = y
    out_y = ys(len(c.outputs))
    wires += [(len(c.layers), prev_y[src], len(c.layers) + 1, out_y[o], None) for o, src in enumerate(c.outputs)]
    return boxes, wires


class Scene:
    """A picture as shapes in data units: wires [(x0, y0, x1, y1)] by mark (None: a true wire,
    True: right, False: wrong), boxes (centre, edge colour), input dots, output squares (x, y,
    colour) and texts (x, y, text, points, colour, align), inside `frame` (left, top, width, height)."""

    def __init__(self):
        self.wires = {None: [], True: [], False: []}
        self.boxes, self.dots, self.squares, self.texts = [], [], [], []
        self.frame = (0.0, 0.0, 1.0, 1.0)

    def text(self, x: float, y: float, text: str, points: float = 8.5, colour: str = "black", align: str = "center") -> None:
        self.texts.append((x, y, text, points, colour, align))

    def panel(self, boxes, wires, shape: tuple[int, int, int], title: str, origin: tuple[float, float]) -> None:
        """One panel at origin: wires, module boxes (gate label; library module under it), input
        dots x0.., output squares y0.. (red when read from the wrong module) and the panel title."""
        (n_inputs, n_outputs, depth), (ox, oy), half = shape, origin, BOX_W / 2
        for x0, y0, x1, y1, ok in wires:
            start, end = x0 + (half if x0 > 0 else 0.08), x1 - (half if x1 <= depth else 0.08)
            self.wires[ok].append((ox + start, oy + y0, ox + end, oy + y1))
        for x, y, label, sub, colour, misplaced in boxes:
            self.boxes.append((ox + x, oy + y, colour))
            self.text(ox + x, oy + y + (0.14 if sub else 0), label, colour=colour if label == "?" else "black")
            if sub:
                self.text(ox + x, oy + y - 0.22, sub, points=7, colour=WRONG if misplaced else INK)
        for i, y in enumerate(ys(n_inputs)):
            self.dots.append((ox, oy + y))
            self.text(ox - 0.12, oy + y, f"x{i}", points=8, align="right")
        wrong = {y1 for x0, y0, x1, y1, ok in wires if x1 == depth + 1 and ok is False}
        for o, y in enumerate(ys(n_outputs)):
            colour = WRONG if y in wrong else DARK
            self.squares.append((ox + depth + 1, oy + y, colour))
            self.text(ox + depth + 1.12, oy + y, f"y{o}", points=8, colour=colour, align="left")
        self.text(ox + (depth + 1) / 2, oy + max(n_inputs, 1) / 2 + 0.5, title, points=9)


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


def scene(p: dict, task_marks_: list[dict] | None = None) -> Scene:
    """The picture of `picture_of(result)`: per task a row of panels, truth | learned."""
    task_marks_ = task_marks_ or marks(p)
    cs = p["circuits"] if comparable(p) else None
    depth, n_inputs, n_outputs = len(p["routing"]["inputs"]), p["n_inputs"], len(p["routing"]["outputs"][0])
    heights = column_heights(p, task_marks_, cs)
    rows, shape = max(n_inputs, *heights, n_outputs), (n_inputs, n_outputs, depth)
    width, height = depth + PANEL_W, rows + TITLE_H  # one panel, in data units
    s = Scene()
    for t, tm in enumerate(task_marks_):
        task, top = f" (task {t})" if len(task_marks_) > 1 else "", -t * height
        if cs:
            s.panel(*true_panel(cs[t], heights), shape, f"true circuit{task}", (0, top))
        verdict = f": {score(tm)}" if cs else ", no true circuit to compare"
        learned = learned_panel(tm, n_inputs, heights, p["skip_output"])
        s.panel(*learned, shape, f"learned{task}{verdict}", (width if cs else 0, top))
    left, top = -0.75, rows / 2 + TITLE_H - 0.2 + 0.6
    s.frame = (left, top, (2 if cs else 1) * width, len(task_marks_) * height + 0.6)
    s.text(left + 0.1, top - 0.35, p.get("title", ""), points=10, align="left")
    return s


# ---------------------------------------------------------------------------------------------
# Rendering a Scene with Pillow (a core dependency: no matplotlib in the training process)

WIRE_STYLES = {None: (GREY, 0.8, None), True: (INK, 0.9, None), False: (WRONG, 1.3, (3, 2))}  # colour, points, dash
DPI = 96  # pixels per inch: a row is 31 pixels, a module label 11
SUPERSAMPLE = 2  # shapes are drawn at twice the size and scaled down: smooth diagonal wires


@functools.lru_cache(maxsize=16)
def font(pixels: int):
    """Pillow's built-in font at a pixel size (Pillow >= 10.1; a Pillow built without FreeType gives
    its one fixed-size bitmap font), rendering each label once (`cached_masks`)."""
    from PIL import ImageFont

    f = ImageFont.load_default(size=pixels)
    if hasattr(f, "getmask2"):
        f.getmask2 = cached_masks(f.getmask2)
    return f


def cached_masks(getmask2):
    """A font's `getmask2` (the glyphs of a text, rendered by FreeType: ImageDraw.text calls it for
    every label) that renders each text at each sub-pixel offset once. The pictures of a run repeat
    their labels at the same places, so most labels are rendered once per worker, not once per
    picture: about 2 of a picture's 11 ms, with the same PNG bytes. The mask is only read."""
    cached = functools.lru_cache(maxsize=4096)(getmask2)

    def masks(*args, **kwargs):
        try:
            return cached(*args, **kwargs)
        except TypeError:  # an argument that cannot be a key (a list of font features)
            return getmask2(*args, **kwargs)

    masks.cache_info = cached.cache_info
    return masks


def dashes(x0: float, y0: float, x1: float, y1: float, on: float, off: float):
    """The pieces of a dashed line (lengths in pixels)."""
    length = max(float(np.hypot(x1 - x0, y1 - y0)), 1e-9)
    for a in np.arange(0.0, length, on + off):
        b = min(a + on, length)
        yield (x0 + (x1 - x0) * a / length, y0 + (y1 - y0) * a / length, x0 + (x1 - x0) * b / length, y0 + (y1 - y0) * b / length)


def render(s: Scene, path, dpi: int = DPI) -> Path:
    """Write the scene as a PNG: one row is ROW_IN and one column COL_IN inches at `dpi`."""
    from PIL import Image, ImageDraw

    left, top, width, height = s.frame
    size = (round(width * COL_IN * dpi), round(height * ROW_IN * dpi))
    pt = dpi / 72  # pixels per point
    big = Image.new("RGB", (size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE), "white")
    at = lambda x, y, scale=1: ((x - left) * COL_IN * dpi * scale, (top - y) * ROW_IN * dpi * scale)  # data -> pixels
    draw_shapes(ImageDraw.Draw(big), s, lambda x, y: at(x, y, SUPERSAMPLE), pt * SUPERSAMPLE)
    image = big.reduce(SUPERSAMPLE)  # a box filter over SUPERSAMPLE² pixels (3x faster than resize with BOX)
    draw_texts(ImageDraw.Draw(image), s, at, pt)  # at full size: crisp hinted text
    path = Path(path)
    image.quantize(64, method=Image.Quantize.FASTOCTREE).save(path)  # 64 colours: a third of the bytes, less time
    return path


def draw_shapes(d, s: Scene, at, pt: float) -> None:
    """Wires, boxes, dots and squares; `at` maps data units to pixels, pt is pixels per point."""
    for ok, (colour, points, dash) in WIRE_STYLES.items():
        w = max(1, round(points * pt))
        for x0, y0, x1, y1 in s.wires[ok]:
            (a, b), (c, e) = at(x0, y0), at(x1, y1)
            for piece in dashes(a, b, c, e, dash[0] * pt, dash[1] * pt) if dash else [(a, b, c, e)]:
                d.line(piece, fill=colour, width=w)
    bw, bh = at(BOX_W, 0)[0] - at(0, 0)[0], at(0, 0)[1] - at(0, BOX_H)[1]
    for x, y, colour in s.boxes:
        cx, cy = at(x, y)
        d.rectangle((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), fill="white", outline=colour, width=round(1.5 * pt))
    r = 1.5 * pt
    for x, y in s.dots:
        cx, cy = at(x, y)
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=DARK)
    for x, y, colour in s.squares:
        cx, cy = at(x, y)
        d.rectangle((cx - 1.1 * r, cy - 1.1 * r, cx + 1.1 * r, cy + 1.1 * r), fill=colour)


@functools.lru_cache(maxsize=4096)
def text_box(text: str, pixels: int) -> tuple[int, int, int, int]:
    """`ImageDraw.textbbox((0, 0), text)` of an RGB picture in the built-in font at this size: the
    same labels come back in every picture, and measuring one costs as much as drawing it."""
    from PIL import Image, ImageDraw

    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font(pixels))


def draw_texts(d, s: Scene, at, pt: float) -> None:
    """Every text, vertically centred on its point and aligned left, centre or right of it. The
    built-in font has no "¬": a complemented gate ("¬MAJ") is drawn with a bar over its name."""
    for x, y, text, points, colour, align in s.texts:
        pixels, bar = max(7, round(points * pt)), text.startswith("¬")
        f, text = font(pixels), text.removeprefix("¬")
        x0, _, x1, _ = text_box(text, pixels)
        top, bottom = text_box("X0", pixels)[1::2]  # the same baseline for every text of a size
        cx, cy = at(x, y)
        left = cx - {"left": 0, "center": (x1 - x0) / 2, "right": x1 - x0}[align]
        d.text((left - x0, cy - (top + bottom) / 2), text, font=f, fill=colour)
        if bar:
            over = cy - (bottom - top) / 2 - 1
            d.line((left, over, left + x1 - x0, over), fill=colour, width=1)


def draw(p: dict, path, dpi: int = DPI) -> Path:
    """Write the picture of `picture_of(result)` to path (PNG): per task, truth | learned.
    Rows are a fixed height in inches, so that wide circuits (16+ inputs) grow, not shrink."""
    return render(scene(p), path, dpi)


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


def drawn_content(p: dict, task_marks_: list[dict]) -> str:
    """Everything a picture shows (routing, labels and marks), not the module outputs behind them."""
    shown = [[{k: v for k, v in m.items() if k != "table"} for layer in tm["layers"] for m in layer] for tm in task_marks_]
    return repr((p["routing"], shown, [tm["output_marks"] for tm in task_marks_], p["title"]))


def draw_changed(result: dict, path, drawn: str | None) -> str | None:
    """Draw the picture of `result` to `path` unless `drawn`, what the file there shows (as
    `drawn_content`), is already what it would show; returns what it shows (None: no picture)."""
    p = picture_of(result)
    if p is None:
        return None
    task_marks_ = marks(p)
    key = drawn_content(p, task_marks_)
    if key != drawn:
        render(scene(p, task_marks_), path)
    return key


class Pictures:
    """`logger.pictures`: circuit.png in each run folder at the end, and the picture logged to the
    W&B run at checkpoints during training (the trainer calls `checkpoint` at every other recovery
    checkpoint; the W&B worker draws these, redrawing only when what a picture shows changed) and
    at the end. Off (Pillow never imported) when disabled, for models without routed modules and
    when Pillow is missing (one warning). Only the first `limit` replicates of a run get pictures
    (`logger.max_pictures`: a picture costs about 15 ms, 1024 seeds would spend seconds drawing);
    `scripts/draw_circuit.py` draws any other from its results."""

    def __init__(self, enabled: bool, model, task, logs, limit: int = 16):
        self.circuits = [circuit_json(c) for c in task.circuits] if task.circuits else None
        self.dirs, self.runs, self.configs = logs.dirs, logs.runs, logs.configs
        self.on = bool(enabled) and has_modules(model) and available() and limit > 0
        self.pictured = set(self.dirs[: max(0, int(limit))])  # the run folders that get pictures
        self.drawn: dict[Path, str] = {}

    def checkpoint(self, model, task, epoch: int) -> None:
        """The W&B pictures during training: the results they show, sent to the W&B worker, which
        draws them (`log_picture`), so that the training process does not spend ~15 ms a picture."""
        if not self.on or not any(getattr(run, "live", False) for run in self.runs):
            return
        modules = modules_json(model, task.circuits)
        for d, run, routing, mods, config in zip(self.dirs, self.runs, model.routing_summary(), modules, self.configs):
            if getattr(run, "live", False) and d in self.pictured:
                result = {"routing": routing, "modules": mods, "circuits": self.circuits, "config": config}
                run.log_picture("circuit", result, step=epoch)

    def picture(self, result: dict, d: Path) -> Path:
        """d/circuit.png of this result, drawn unless the last one drawn there shows the same."""
        path = d / "circuit.png"
        self.drawn[d] = draw_changed(result, path, self.drawn.get(d) if path.exists() else None)
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
