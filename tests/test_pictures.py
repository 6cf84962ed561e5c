"""Circuit pictures (modnets.draw), the module table and the pictures in offline W&B runs."""

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from modnets import draw, recovery
from modnets.circuits import MULTITASK, PRESETS, random_circuit
from modnets.results import seal
from modnets.train import run

ROOT = Path(__file__).resolve().parent.parent


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def perfect(circuits, shared=False) -> dict:
    """A results dict whose learned network is exactly the true circuits (tables = gate tables)."""
    c = circuits[0]
    k = c.arity
    library = list(dict.fromkeys(op for cc in circuits for op in cc.library))
    if shared:
        tables = [[recovery.gate_table(op, k).tolist() for op in library]]
    else:
        tables = [[recovery.gate_table(g.op, k).tolist() for g in layer] for layer in c.layers]
    gates = [[draw.gate_of(t, k, library) for t in bank] for bank in tables]
    modules = {"k": k, "n_inputs": c.n_inputs, "tables": tables, "gates": gates}
    depth = range(len(c.layers))
    routing = {"inputs": [[cc.routing[i] for cc in circuits] for i in depth], "outputs": [list(cc.outputs) for cc in circuits]}
    if shared:
        routing["locations"] = [[[library.index(g.op) for g in cc.layers[i]] for cc in circuits] for i in range(len(c.layers))]
    return {"routing": routing, "modules": modules, "circuits": [draw.circuit_json(cc) for cc in circuits], "config": {"seed": 0}}


def states(marks: list[dict]) -> list[str]:
    return [m["state"] for tm in marks for layer in tm["layers"] for m in layer]


def test_gate_of_names_every_gate_and_gives_question_marks_for_constant_or_tangled_tables():
    names = draw.gate_names(2, None)
    for op in names:
        assert draw.gate_of(recovery.gate_table(op, 2), 2, names) == op
    assert draw.gate_of([1.0, -0.3, -0.4, 1.2], 2, names) == "XNOR"  # graded: the widest margin wins over AND
    assert draw.gate_of([0.5, 0.5, 0.5, 0.5], 2, names) == "?"
    assert draw.gate_of([0, 1, 1, 0, 1, 0, 0, 1], 3, ["AND", "MAJ"]) == "?"  # 3-input parity: not in this library
    assert draw.gate_of([1, 1, 1, 0, 1, 0, 0, 0], 3, draw.gate_names(3, None)) == "¬MAJ"


@pytest.mark.parametrize("shared", [False, True])
def test_the_true_circuit_is_all_correct_and_a_wrong_wire_gate_or_slot_is_marked(shared):
    result = perfect([PRESETS[(6, 3, 3, 2, 2)]], shared)
    p = draw.picture_of(result)
    marks = draw.marks(p)
    assert set(states(marks)) == {"ok"}
    assert all(all(m["wires"]) for layer in marks[0]["layers"] for m in layer) and all(marks[0]["output_marks"])
    wrong = json.loads(json.dumps(result))
    wrong["routing"]["inputs"][1][0][1] = [0, 2]  # layer 2, module 1 reads (0, 2), truth (1, 2)
    if shared:
        wrong["routing"]["locations"][2][0][0] = 0  # an OR slot uses the XOR library module
    else:
        wrong["modules"]["tables"][0][2] = recovery.gate_table("AND", 2).tolist()  # layer 1, module 2 computes AND, not XOR
        wrong["modules"]["gates"][0][2] = "AND"
    marks = draw.marks(draw.picture_of(wrong))
    layers = marks[0]["layers"]
    assert [m["wires"] for m in layers[1]] == [[True, True], [False, True], [True, True]]
    if shared:
        assert layers[2][0]["state"] == "wrong" and layers[2][0]["misplaced"]
        assert states(marks).count("wrong") == 1
    else:
        assert layers[0][2]["state"] == "wrong" and layers[0][2]["label"] == "AND"
        assert states(marks).count("wrong") == 1


def test_learned_modules_are_drawn_at_the_place_of_their_true_module():
    result = perfect([PRESETS[(6, 3, 2, 2)]])
    r = result["routing"]
    r["inputs"][0][0] = [[4, 5], [2, 3], [0, 1]]  # modules 0 and 2 swapped, and the next layer reads them swapped
    r["inputs"][1][0] = [[2, 1], [1, 0]]
    tables = result["modules"]["tables"][0]
    tables[0], tables[2] = tables[2], tables[0]
    marks = draw.marks(draw.picture_of(result))
    assert [m["place"] for m in marks[0]["layers"][0]] == [2, 1, 0]
    assert set(states(marks)) == {"ok"}


@pytest.mark.parametrize(
    "overrides,tasks,shared",
    [
        (["experiment=modular"], 1, False),
        (["experiment=shared"], 1, True),
        (["task=bool_multitask"], 3, False),
        (["task=bool_random", "task.n_inputs=16", "task.samples=4096"], 1, False),
    ],
    ids=["modular", "shared", "multitask", "random16"],
)
def test_a_run_writes_its_picture_and_results_hold_what_it_needs(cfg_in, tmp_path, overrides, tasks, shared):
    run(cfg_in(*overrides, "trainer.epochs=3"))
    folder = tmp_path / "run"
    result = json.loads((folder / "results.json").read_text())
    n_inputs = result["circuits"][0]["n_inputs"]
    assert len(result["circuits"]) == tasks and len(result["routing"]["outputs"]) == tasks
    banks = result["modules"]["tables"]
    assert len(banks) == (1 if shared else len(result["routing"]["inputs"]))
    assert all(len(row) == 2 ** result["modules"]["k"] for bank in banks for row in bank)
    width, height = png_size(folder / "circuit.png")
    rows = max(n_inputs, *(len(layer[0]) for layer in result["routing"]["inputs"]))
    assert height >= tasks * rows * 0.3 * 80  # legible: at least 24 pixels per unit of the tallest column, per task
    assert width >= 2 * (len(result["routing"]["inputs"]) + 2) * 0.9 * 80  # truth and learned side by side
    again = tmp_path / "again.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "draw_circuit.py"), str(folder / "results.json"), "--out", str(again)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert png_size(again) == (width, height)


def test_mlp_runs_have_no_picture(cfg_in, tmp_path):
    result = run(cfg_in("experiment=mlp", "trainer.epochs=1"))[0]
    assert result["modules"] is None and not (tmp_path / "run" / "circuit.png").exists()


def test_only_the_first_max_pictures_replicates_of_a_run_get_a_picture(cfg_in, tmp_path):
    results = run(cfg_in("experiment=modular", "trainer.epochs=1", "trainer.replicates=3", "logger.max_pictures=2"))
    drawn = sorted(p.parent.name for p in (tmp_path / "run").glob("seed_*/circuit.png"))
    assert drawn == ["seed_1", "seed_2"] and all(r["modules"] is not None for r in results)  # seeds 1, 2 of 1..3


def wandb_records(run_dir: Path, wait: float = 30.0) -> list:
    """The records of a finished offline W&B run, read from its .wandb file once it holds the run's
    `exit` record (W&B's own process may still be writing the file when `finish()` returns)."""
    deadline = time.time() + wait
    while True:
        records = read_wandb_file(run_dir)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            return records
        time.sleep(0.2)


def read_wandb_file(run_dir: Path) -> list:
    """The records of the .wandb file of a W&B run folder (a LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, part, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def test_offline_wandb_run_holds_the_metrics_the_pictures_and_the_module_table(cfg_in, tmp_path, monkeypatch):
    rendered = []
    render = draw.render
    monkeypatch.setattr(draw, "render", lambda s, path, *a: rendered.append(path) or render(s, path, *a))
    run(cfg_in("experiment=modular", "trainer.epochs=20", "logger.mode=offline"))
    assert rendered == [tmp_path / "run" / "circuit.png"]  # this process draws the end's; the W&B worker the others
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    history, config = [], {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert config["arch"] == "modular learned" and config["task_name"] == "bool_6_3_2_2"  # keys to group by
    assert "arch" not in result["config"]  # W&B only: the results' config (and its hash) is unchanged
    by_step = {}
    for h in history:  # W&B may write one step in several records
        by_step.setdefault(h["_step"], {}).update(h)
    assert by_step[20]["epoch"] == 20 and by_step[20]["heldout_acc"] == pytest.approx(result["final"]["heldout_acc"])
    pictures = sorted(h["_step"] for h in history if h.get("circuit/_type") == "image-file")
    assert pictures == [4, 8, 12, 16, 20]  # every other recovery checkpoint (every 2 epochs) and the end
    images = list((run_dir / "files" / "media" / "images").glob("circuit_*.png"))
    assert len(images) == 5 and all(png_size(p)[1] > 100 for p in images)
    assert all((run_dir / "files" / by_step[s]["circuit/path"]).exists() for s in pictures)  # the history names the file
    (table,) = (run_dir / "files" / "media" / "table").glob("modules_*.table.json")
    table = json.loads(table.read_text())
    assert len(table["data"]) == 3 + 2  # one row per module slot
    assert {row[table["columns"].index("inputs read")].count(",") for row in table["data"]} == {1}  # two inputs each


SNIPPET = """
import sys
sys.path.insert(0, {tests!r})
{block}
from conftest import make_cfg
from modnets.train import run
run(make_cfg("experiment=modular", "trainer.epochs=4", "logger.mode={mode}", "logger.pictures={pictures}", output_dir={out!r}))
print("matplotlib" in sys.modules, "PIL" in sys.modules)
"""


def python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("pictures", [False, True])
def test_the_training_process_never_imports_matplotlib_and_pictures_false_draws_nothing(tmp_path, pictures):
    """The default path (offline W&B, pictures at the checkpoints and the end) draws with Pillow only."""
    code = SNIPPET.format(tests=str(ROOT / "tests"), block="", pictures=pictures, mode="offline", out=str(tmp_path / "run"))
    proc = python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["False", str(pictures)]  # matplotlib never; Pillow only to draw
    assert (tmp_path / "run" / "circuit.png").exists() == pictures
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    images = list((run_dir / "files" / "media" / "images").glob("circuit_*.png"))
    assert len(images) == (2 if pictures else 0)  # epoch 2 (every other recovery checkpoint) and the end


def test_the_w_and_b_worker_draws_pictures_without_importing_torch():
    code = "import sys, modnets.draw, modnets.logger; print('torch' in sys.modules)"
    proc = python(code)
    assert proc.returncode == 0 and proc.stdout.split() == ["False"], proc.stderr[-2000:]


def test_without_pillow_one_warning_names_the_fix_and_the_run_completes(tmp_path):
    block = "sys.modules['PIL'] = None  # as if not installed"
    code = SNIPPET.format(tests=str(ROOT / "tests"), block=block, pictures=True, mode="disabled", out=str(tmp_path / "run"))
    proc = python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "Pillow" in line]
    assert len(warnings) == 1 and "pip install pillow" in warnings[0]
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["status"] == "completed" and result["modules"]["gates"]
    assert not (tmp_path / "run" / "circuit.png").exists()


def red_pixels(path: Path) -> np.ndarray:
    """(x, y) of the pixels drawn in the colour of wrong marks (or nearly: wires are smoothed)."""
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    wrong = np.array([int(draw.WRONG[i : i + 2], 16) for i in (1, 3, 5)])
    y, x = np.nonzero(np.abs(rgb - wrong).sum(axis=2) < 60)
    return np.stack([x, y], axis=1)


def test_a_wrong_wire_is_drawn_in_red_where_it_runs_and_nothing_else_is_red(tmp_path):
    result = perfect([PRESETS[(6, 3, 3, 2, 2)]])
    assert len(red_pixels(draw.draw(draw.picture_of(result), tmp_path / "right.png"))) == 0
    result["routing"]["inputs"][1][0][1] = [0, 2]  # layer 2, module 1 reads (0, 2), truth (1, 2): one wrong wire
    p = draw.picture_of(result)
    scene = draw.scene(p)
    (wire,) = scene.wires[False]
    left, top = scene.frame[:2]
    px = [(wire[0] - left) * draw.COL_IN * draw.DPI, (wire[2] - left) * draw.COL_IN * draw.DPI]
    py = [(top - wire[1]) * draw.ROW_IN * draw.DPI, (top - wire[3]) * draw.ROW_IN * draw.DPI]
    red = red_pixels(draw.draw(p, tmp_path / "wrong.png"))
    assert len(red) > 10  # dashes along the wire
    assert min(px) - 3 <= red[:, 0].min() and red[:, 0].max() <= max(px) + 3  # ... and red nowhere else
    assert min(py) - 3 <= red[:, 1].min() and red[:, 1].max() <= max(py) + 3


@pytest.mark.parametrize("n_inputs", [16, 32])
def test_a_wide_random_circuits_picture_has_fixed_rows_and_a_bounded_size(tmp_path, n_inputs):
    c = random_circuit(n_inputs, [n_inputs // 2, n_inputs // 4, n_inputs // 8], seed=1)
    path = draw.draw(draw.picture_of(perfect([c])), tmp_path / "wide.png")
    width, height = png_size(path)
    assert height == round((n_inputs + draw.TITLE_H + 0.6) * draw.ROW_IN * draw.DPI)  # one fixed-height row per input
    assert width == round(2 * (3 + draw.PANEL_W) * draw.COL_IN * draw.DPI)  # two panels of three layers, however many inputs
    assert path.stat().st_size < 3000 * n_inputs  # small enough to log at every checkpoint


def test_multitask_marks_follow_each_tasks_own_circuit():
    marks = draw.marks(draw.picture_of(perfect(MULTITASK, shared=True)))
    assert len(marks) == 3 and set(states(marks)) == {"ok"}
    assert [len(tm["layers"][0]) for tm in marks] == [3, 3, 4]
    assert np.all([all(tm["output_marks"]) for tm in marks])


def test_aggregate_wandb_logs_one_table_row_per_configuration_and_the_figures_to_the_sweeps_group(tmp_path):
    from test_sweeps import aggregate, write_run

    for i, (fraction, acc) in enumerate([(0.3, 0.6), (0.3, 0.7), (0.6, 0.9), (0.6, 0.8), (0.9, 1.0), (0.9, 0.95)]):
        folder = tmp_path / "sweep" / str(i)
        write_run(folder, i % 2, acc, fraction=fraction)
        result = json.loads((folder / "results.json").read_text())
        (folder / "results.json").write_text(json.dumps(seal(result | {"wandb_group": "multirun/study-a"})))
    assert aggregate.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "agg"), "--wandb"]) == 0
    (run_dir,) = (tmp_path / "agg" / "wandb").glob("offline-run-*")
    (info,) = [r.run for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "run"]
    assert info.run_group == "multirun/study-a" and info.job_type == "aggregate"
    (table,) = (run_dir / "files" / "media" / "table").glob("summary_*.table.json")
    table = json.loads(table.read_text())
    fractions = [row[table["columns"].index("task.train_fraction")] for row in table["data"]]
    assert sorted(fractions) == [0.3, 0.6, 0.9]  # one row per configuration
    assert table["data"][0][table["columns"].index("n")] == 2
    images = {p.name.split("_0_")[0] for p in (run_dir / "files" / "media" / "images").glob("*.png")}
    assert images == {"heldout_vs_fraction", "learning_curves", "recovery"}


def test_without_a_true_circuit_the_learned_network_is_drawn_alone(cfg_in, tmp_path):
    result = run(cfg_in("task=bool_6_2", "model.num_modules=[3,2]", "trainer.epochs=2"))[0]
    assert result["circuits"] is None and len(result["modules"]["gates"]) == 2
    p = draw.picture_of(result)
    assert not draw.comparable(p) and {m["state"] for tm in draw.marks(p) for layer in tm["layers"] for m in layer} == {None}
    width, _ = png_size(tmp_path / "run" / "circuit.png")
    assert width < 2 * (2 + draw.PANEL_W) * draw.COL_IN * draw.DPI  # one panel, not two


def test_labels_rendered_once_give_the_same_png_bytes_as_pillow_alone(tmp_path, monkeypatch):
    """`draw.font`'s cached glyph masks: several pictures (wrong wires, other tasks) drawn with them
    and with Pillow's own fonts are the same files, and the cache serves most labels."""
    from PIL import ImageFont

    wrong = perfect([PRESETS[(6, 3, 3, 2, 2)]])
    wrong["routing"]["inputs"][1][0][1] = [0, 2]
    results = [perfect([PRESETS[(6, 3, 3, 2, 2)]]), wrong, perfect(MULTITASK, shared=True), perfect([PRESETS[(6, 3, 2, 2)]])]
    draw.font.cache_clear()
    cached = [draw.draw(draw.picture_of(r), tmp_path / f"cached{i}.png").read_bytes() for i, r in enumerate(results * 2)]
    hits = sum(draw.font(px).getmask2.cache_info().hits for px in range(6, 40))
    monkeypatch.setattr(draw, "font", lambda pixels: ImageFont.load_default(size=pixels))
    plain = [draw.draw(draw.picture_of(r), tmp_path / f"plain{i}.png").read_bytes() for i, r in enumerate(results * 2)]
    assert cached == plain
    assert hits >= len(cached) // 2 * 10  # the second round of pictures: every label from the cache
