"""The assignment solver behind recovery (`recovery.assign`) and the batched recovery metrics.

`assign` must find an optimal assignment of every matrix (checked against brute force) and the
very assignment scipy's `linear_sum_assignment` returns, ties included (checked against scipy
where it is installed: a dev dependency, no longer a runtime one), so that recovery metrics
computed without scipy equal those computed with it.
"""

import itertools

import numpy as np
import pytest

from modnets import draw, recovery
from modnets.circuits import MULTITASK, PRESETS


def tie_heavy(rng, n: int, rows: int, cols: int) -> np.ndarray:
    """Matrices with many equal entries and equal optimal assignments, of four kinds."""
    kind = rng.integers(4)
    if kind == 0:
        return rng.integers(0, 3, (n, rows, cols)).astype(float)
    if kind == 1:
        return rng.random((n, rows, cols))
    if kind == 2:  # recovery's scores: exact matches, shared inputs, in place
        diagonal = np.arange(rows)[:, None] == np.arange(cols)
        return rng.integers(0, 2, (n, rows, cols)) + 1e-2 * rng.integers(0, 3, (n, rows, cols)) + 1e-6 * diagonal
    return np.zeros((n, rows, cols)) + rng.integers(0, 2, (n, 1, cols))  # equal rows


def brute_force_best(m: np.ndarray) -> float:
    """The largest total of any assignment of min(rows, cols) rows to distinct columns."""
    rows, cols = m.shape
    if rows <= cols:
        return max(m[range(rows), list(p)].sum() for p in itertools.permutations(range(cols), rows))
    return max(m[list(p), range(cols)].sum() for p in itertools.permutations(range(rows), cols))


def test_assign_is_optimal_and_a_valid_assignment():
    rng = np.random.default_rng(0)
    for rows, cols in itertools.product(range(1, 6), repeat=2):
        m = tie_heavy(rng, 30, rows, cols)
        for maximize in (True, False):
            got = recovery.assign(m, maximize=maximize)
            assert got.shape == (30, rows)
            for b in range(30):
                taken = got[b][got[b] >= 0]
                assert len(taken) == min(rows, cols) and len(set(taken.tolist())) == len(taken)
                total = m[b][got[b] >= 0, taken].sum()
                best = brute_force_best(m[b]) if maximize else -brute_force_best(-m[b])
                assert total == pytest.approx(best, abs=1e-9)


def test_assign_returns_what_scipy_returns_ties_included():
    scipy = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(1)
    for rows, cols in itertools.product(range(1, 7), repeat=2):
        m = tie_heavy(rng, 40, rows, cols)
        for maximize in (True, False):
            got = recovery.assign(m, maximize=maximize)
            for b in range(len(m)):
                r, c = scipy.linear_sum_assignment(m[b], maximize=maximize)
                want = np.full(rows, -1)
                want[r] = c
                assert got[b].tolist() == want.tolist(), (m[b], maximize)


def test_assign_of_a_constant_matrix_is_the_identity_as_in_scipy():
    assert recovery.assign(np.zeros((2, 3, 3))).tolist() == [[0, 1, 2]] * 2
    assert recovery.assign(np.zeros((1, 3, 2))).tolist() == [[0, 1, -1]]  # tall: rows beyond the columns unassigned
    assert recovery.assign(np.zeros((0, 2, 2))).shape == (0, 2)
    with pytest.raises(ValueError, match="NaN"):
        recovery.assign(np.full((1, 2, 2), np.nan))


def scipy_match_layers(learned, truth):
    """The matching as modnets computed it with scipy, one replicate at a time (the reference)."""
    scipy = pytest.importorskip("scipy.optimize")
    prev, perms, fractions = None, [], []
    for ins, true in zip(learned, truth):
        mapped = [frozenset(int(prev[a]) if prev is not None else int(a) for a in m) for m in ins]
        true_sets = [frozenset(t) for t in true]
        score = np.zeros((len(mapped), len(true_sets)))
        for j, m in enumerate(mapped):
            for t, s in enumerate(true_sets):
                score[j, t] = (m == s) + 1e-2 * len(m & s) + 1e-6 * (j == t)
        rows, cols = scipy.linear_sum_assignment(score, maximize=True)
        perm = np.full(len(mapped), -1)
        perm[rows] = cols
        fractions.append(sum(mapped[j] == true_sets[t] for j, t in zip(rows, cols)) / len(true_sets))
        perms.append(perm)
        prev = perm
    return perms, fractions


def near_routing(rng, circuit, widths, k: int = 2) -> list[np.ndarray]:
    """Learned inputs per layer [modules, k] that are often a true module's (ties in the matching)."""
    def pick(true, w):
        if rng.random() < 0.6:
            return [min(a, w - 1) for a in true[rng.integers(len(true))]]  # within the layer below
        return list(rng.permutation(w)[:k])

    reads = [circuit.n_inputs, *widths[:-1]]
    return [np.array([pick(true, w) for _ in range(n)]) for true, n, w in zip(circuit.routing, widths, reads)]


@pytest.mark.parametrize("widths", [(3, 2), (6, 2), (2, 2)])
def test_batched_matching_equals_scipy_matching_replicate_by_replicate(widths):
    rng = np.random.default_rng(2)
    circuit = PRESETS[(6, 3, 2, 2)]
    learned = [near_routing(rng, circuit, widths) for _ in range(300)]
    perms, fractions = recovery.match_all([np.stack(layer) for layer in zip(*learned)], circuit.routing)
    for r, replicate in enumerate(learned):
        want_perms, want_fractions = scipy_match_layers(replicate, circuit.routing)
        assert [p[r].tolist() for p in perms] == [p.tolist() for p in want_perms]
        assert [float(f[r]) for f in fractions] == want_fractions


@pytest.mark.parametrize("shared", [False, True])
def test_recover_all_equals_recover_of_each_replicate(shared):
    rng = np.random.default_rng(3)
    circuits, widths = MULTITASK, (4, 2)
    routings, tables = [], []
    for _ in range(50):
        per_task = [near_routing(rng, c, widths) for c in circuits]
        routing = {
            "inputs": [[per_task[t][i].tolist() for t in range(len(circuits))] for i in range(len(widths))],
            "outputs": [rng.permutation(widths[-1])[:2].tolist() for _ in circuits],
        }
        if shared:
            routing["locations"] = [[rng.integers(0, 3, n).tolist() for _ in circuits] for n in widths]
        routings.append(routing)
        shape = [(3, 4)] if shared else [(n, 4) for n in widths]
        tables.append([rng.choice([0.0, 1.0, 2.0, np.nan], p=[0.4, 0.35, 0.2, 0.05], size=s) for s in shape])
    batch = [np.stack(t) for t in zip(*tables)]
    together = recovery.recover_all(routings, circuits, batch)
    alone = [recovery.recover(r, circuits, t) for r, t in zip(routings, tables)]
    assert together == alone
    assert len({m["input_routing"] for m in alone}) > 3  # the replicates differ: a real test of the batch


def test_library_relabelling_of_a_picture_is_the_best_one():
    circuit = PRESETS[(6, 3, 2, 2)]  # XOR, XOR, XOR | AND, AND: library [XOR, AND]
    p = {"circuits": [circuit], "routing": {"locations": [[[1, 1, 0]], [[0, 0]]]}}
    identity = [[np.arange(3), np.arange(2)]]
    assert draw.library_relabelling(p, identity) == {1: 0, 0: 1}  # learned 1 is XOR (2 slots), 0 is AND (2 of 3)


def reference_gate_of(outputs, k: int, names: list[str]) -> str:
    """`draw.gate_of` one row at a time, in plain Python loops (as modnets computed it before)."""
    out = np.asarray(outputs, dtype=float)
    spread = float(np.ptp(out)) if np.isfinite(out).all() else 0.0
    best, label = 0.0, "?"
    for sign, prefix in ((1, ""), (-1, "¬")):
        for name in names:
            bits = recovery.gate_table(name, k)
            if 0 < bits.sum() < len(bits) and spread > 0:
                ones, zeros = out[bits == 1], out[bits == 0]
                margin = ones.min() - zeros.max() if sign > 0 else zeros.min() - ones.max()
                if margin / spread > best + 1e-9:
                    best, label = margin / spread, prefix + name
    return label


@pytest.mark.parametrize("k", [2, 3])
def test_gates_of_many_rows_equals_the_row_by_row_labels(k):
    rng = np.random.default_rng(4)
    names = draw.gate_names(k, None)
    rows = rng.choice([-1.0, 0.0, 0.5, 1.0, np.nan, np.inf], p=[0.25, 0.25, 0.1, 0.3, 0.05, 0.05], size=(400, 2**k))
    rows[:100] = rng.normal(size=(100, 2**k))
    many = draw.gates_of(rows, k, names)
    assert many == [reference_gate_of(row, k, names) for row in rows]
    assert "?" in many and len(set(many)) > 4
