"""The results file's layout: one line per top-level key and one line per row of a list of rows,
whatever the rows hold (the checksum of format 2 is over exactly these bytes)."""

import json

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


def test_paused_gc_restores_the_collector():
    import gc

    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()
