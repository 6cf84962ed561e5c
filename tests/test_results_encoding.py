"""The results file's layout: one line per top-level key and one line per row of a list of rows,
whatever the rows hold (the checksum of format 2 is over exactly these bytes)."""

import json
import random

from modnets.results import dumps, paused_gc


def row_by_row(data: dict) -> str:
    """The layout, spelled out one row at a time."""
    lines = []
    for key, value in data.items():
        if isinstance(value, (list, tuple)) and value and all(isinstance(row, dict) for row in value):
            body = "[\n  " + ",\n  ".join(json.dumps(row) for row in value) + "\n ]"
        else:
            body = json.dumps(value)
        lines.append(f" {json.dumps(key)}: {body}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def test_rows_are_one_a_line_even_when_a_row_holds_the_row_separator():
    data = {
        "history": [{"epoch": e, "train_loss": 0.1 * e, "val_acc": 1 / 3} for e in range(1, 5)],
        "nested": [{"k": {"n": 1}}, {"k": {"m": [1, {"z": 2}]}}],  # "}, {" inside a row, not between rows
        "text": [{"s": "}, {"}, {"s": "x"}],
        "empty": [{}],
        "plain": [1, 2],
        "none": None,
    }
    text = dumps(data)
    assert text == row_by_row(data)
    assert json.loads(text) == data
    assert text.count("\n  {") == 4 + 2 + 2 + 1  # every row of every list of rows starts its own line


def test_tables_of_numbers_are_written_as_json_writes_each_row():
    rng = random.Random(0)
    special = [0.0, -0.0, 1.0, float("nan"), float("inf"), -float("inf"), 1 / 3, 0.1, 2.5e-300, 1e22]
    def value(kind: str, few: list):
        if kind == "int":
            return rng.randint(-3, 10**20)
        if kind == "few":
            return rng.choice(few)
        if kind == "many":
            return rng.choice([rng.random(), *special])
        return rng.choice([1, 1.0, True, None, 0.0, -0.0, "x", [1.5]])

    for trial in range(300):
        n_rows, n_keys = rng.randint(1, 40), rng.randint(1, 5)
        few = [rng.choice(special) for _ in range(3)]  # repeated values, as accuracies are
        kinds = [rng.choice(["int", "few", "many", "mixed"]) for _ in range(n_keys)]
        columns = [[value(kind, few) for _ in range(n_rows)] for kind in kinds]
        keys = [f"k{i}" for i in range(n_keys)]
        data = {"history": [dict(zip(keys, row)) for row in zip(*columns)]}
        assert dumps(data) == row_by_row(data), trial


def test_paused_gc_restores_the_collector():
    import gc

    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()
