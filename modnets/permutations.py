"""Every replicate's `torch.randperm(n, generator=g)`, for thousands of replicates at once.

A run of R replicates draws each epoch's minibatch order from each replicate's own generator, so
that replicate r is exactly the run with seed `seed + r`. One `torch.randperm` per replicate costs
a few microseconds of Python and dispatch: 4 ms an epoch at R = 1024 on a CPU, 28 ms at R = 4096
on a GPU machine's host, where the device's whole epoch takes less. `Permutations` draws the same
numbers from copies of the generators' states, all replicates at once with numpy:

- a CPU `torch.Generator` is a 32-bit Mersenne Twister (MT19937), and `get_state()` lays out its
  state as: initial seed (uint64), `left` (int32), `seeded` (int32), `next` (uint64), the 624
  state words (each in a uint64), then the cached normal samples (5056 bytes in all);
- `randperm(n)` on a CPU, for n below 2**32 / 20, starts from 0 … n-1 and swaps position i with
  position i + (one 32-bit draw) % (n - i), for i = 0 … n-2 (Fisher-Yates);
- the twist, the tempering and the swaps are elementwise across replicates.

`sync()` writes the advanced states back into the generators (nothing else of them changes), so
afterwards they are what R `torch.randperm` calls would have left. `tests/test_permutations.py`
checks both against torch for many seeds, sizes and twists. `Permutations.of` gives None for
generators it cannot read this way (another layout, replicates at different points of their
streams); callers then draw with torch.
"""

from __future__ import annotations

import numpy as np
import torch

N, M = 624, 397  # MT19937's state words and its shift
MATRIX_A, UPPER, LOWER = np.uint32(0x9908B0DF), np.uint32(0x80000000), np.uint32(0x7FFFFFFF)
STATE_BYTES = 5056  # CPU generator's get_state(): seed, left, seeded, next, state[624] as uint64, normals
LEFT, NEXT, WORDS = slice(8, 12), slice(16, 24), slice(24, 24 + 8 * N)


def _fields(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`left` and `next` of states [R, STATE_BYTES] (uint8)."""
    return raw[:, LEFT].copy().view(np.int32)[:, 0], raw[:, NEXT].copy().view(np.uint64)[:, 0]


def _remainder(y: np.ndarray, d: np.ndarray) -> np.ndarray:
    """y % d for 32-bit y and 0 < d < 2**32 (int64), through float64 division, which is faster than
    integer division and exact here: when d does not divide y, y / d is at least 1 / d below the
    next integer, and its rounding error, at most y / d * 2**-53, is less than that (y < 2**53)."""
    y = y.astype(np.int64)
    return y - np.floor(y / d).astype(np.int64) * d


class Permutations:
    """The Mersenne Twister states of `generators` ([R, STATE_BYTES] bytes, as `get_state()` gives
    them), advanced together by `__call__(n)`. Made by `of`."""

    def __init__(self, generators: list[torch.Generator], raw: np.ndarray):
        self.generators, self.raw = generators, raw
        left, next_ = _fields(raw)
        self.left, self.next = int(left[0]), int(next_[0])
        self.words = raw[:, WORDS].copy().view(np.uint64).T.astype(np.uint32)  # [N, R]: a word of every replicate in a row
        self.rows = np.arange(len(generators))

    @classmethod
    def of(cls, generators: list[torch.Generator], n: int) -> Permutations | None:
        """Permutations of n for these generators, or None where their states cannot be read as
        above: not CPU generators, another layout, replicates at different points of their
        streams (those of one run never are), or n too large for torch's small-n algorithm."""
        if not generators or n >= 2**32 // 20 or any(g.device.type != "cpu" for g in generators):
            return None
        states = [g.get_state() for g in generators]
        if any(s.dtype != torch.uint8 or s.numel() != STATE_BYTES for s in states):
            return None
        raw = np.stack([s.numpy() for s in states])
        left, next_ = _fields(raw)
        words_fit = bool((raw[:, WORDS].copy().view(np.uint64) < 2**32).all())
        same = bool((left == left[0]).all() and (next_ == next_[0]).all())
        return cls(generators, raw) if words_fit and same and 1 <= left[0] <= N + 1 and next_[0] <= N else None

    def _twist(self) -> None:
        """MT19937's next state (the reference `genrand` loop, in three slices whose sources are
        already final); every replicate at once."""
        w = self.words

        def mix(i: slice, i1: slice, source: slice) -> None:
            y = (w[i] & UPPER) | (w[i1] & LOWER)
            w[i] = w[source] ^ (y >> 1) ^ ((y & 1) * MATRIX_A)

        mix(slice(0, N - M), slice(1, N - M + 1), slice(M, N))  # from the old words 397 … 623
        mix(slice(N - M, 2 * (N - M)), slice(N - M + 1, 2 * (N - M) + 1), slice(0, N - M))  # the new 0 … 226
        mix(slice(2 * (N - M), N - 1), slice(2 * (N - M) + 1, N), slice(N - M, M - 1))  # the new 227 … 395
        y = (w[N - 1] & UPPER) | (w[0] & LOWER)
        w[N - 1] = w[M - 1] ^ (y >> 1) ^ ((y & 1) * MATRIX_A)

    def draw(self, k: int) -> np.ndarray:
        """The next k 32-bit outputs of every generator, [k, R] (uint32), as k `random()` calls."""
        out = []
        while k > 0:
            if self.left <= 1:  # the next call twists first
                self._twist()
                self.left, self.next = N + 1, 0
            m = min(k, self.left - 1)
            y = self.words[self.next : self.next + m].copy()
            y ^= y >> 11
            y ^= (y << 7) & np.uint32(0x9D2C5680)
            y ^= (y << 15) & np.uint32(0xEFC60000)
            y ^= y >> 18
            out.append(y)
            self.left, self.next, k = self.left - m, self.next + m, k - m
        return np.concatenate(out) if len(out) != 1 else out[0]

    def __call__(self, n: int) -> torch.Tensor:
        """Every replicate's `torch.randperm(n, generator=g)`, [R, n] (int64, on the CPU)."""
        R = len(self.rows)
        perm = np.repeat(np.arange(n, dtype=np.int64), R)  # [n * R]: position j of replicate r at j * R + r
        if n > 1:
            steps = np.arange(n - 1)[:, None]
            other = (_remainder(self.draw(n - 1), n - steps) + steps) * R + self.rows  # [n-1, R]
            at = perm.reshape(n, R)
            for i in range(n - 1):  # position i swaps with position `other`: one row of `at` with a gather
                swapped = at[i].copy()
                at[i] = perm.take(other[i])
                perm.put(other[i], swapped)
        return torch.from_numpy(perm.reshape(n, R).T.copy())

    def sync(self) -> None:
        """Write the advanced states into the generators."""
        raw = self.raw.copy()
        raw[:, WORDS] = np.ascontiguousarray(self.words.T, dtype=np.uint64).view(np.uint8)
        raw[:, LEFT] = np.full((len(raw), 1), self.left, np.int32).view(np.uint8)
        raw[:, NEXT] = np.full((len(raw), 1), self.next, np.uint64).view(np.uint8)
        for g, state in zip(self.generators, torch.from_numpy(raw), strict=True):
            g.set_state(state.clone())
