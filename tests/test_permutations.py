"""modnets.permutations: every replicate's torch.randperm, all at once, with the same numbers."""

import numpy as np
import pytest
import torch

from modnets.permutations import Permutations


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("n", [0, 1, 2, 13, 51, 700, 1300])
def test_permutations_are_torch_randperm_of_each_generator(n):
    """Draws across several twists of the Mersenne Twister (624 words each): 40 epochs of n - 1."""
    seeds = [0, 1, 7, 123456789, 2**31 - 1, 2**40 + 3]
    ours, theirs = generators(seeds), generators(seeds)
    at_once = Permutations.of(ours, n)
    for _ in range(40):
        expected = torch.stack([torch.randperm(n, generator=g) for g in theirs])
        assert torch.equal(at_once(n), expected)
    at_once.sync()
    for g, h in zip(ours, theirs, strict=True):  # the generators go on as if torch had drawn
        assert torch.equal(g.get_state(), h.get_state())
        assert torch.equal(torch.randn(7, generator=g), torch.randn(7, generator=h))


def test_generators_met_mid_stream_draw_on_from_where_they_are():
    ours, theirs = generators(range(4)), generators(range(4))
    for g in ours + theirs:  # 600 words used: the next randperm crosses a twist
        torch.randint(10, (600,), generator=g)
    at_once = Permutations.of(ours, 51)
    for _ in range(3):
        assert torch.equal(at_once(51), torch.stack([torch.randperm(51, generator=g) for g in theirs]))


def test_output_words_are_mt19937():
    """The first outputs of seed 5489 are the reference MT19937's (its published test vector)."""
    at_once = Permutations.of(generators([5489]), 2)
    assert at_once.draw(3)[:, 0].tolist() == [3499211612, 581869302, 3890346734]


def test_generators_at_different_points_are_not_usable():
    gens = generators(range(3))
    assert Permutations.of(gens, 51) is not None
    torch.randperm(5, generator=gens[1])
    assert Permutations.of(gens, 51) is None
    assert Permutations.of([], 51) is None
    assert Permutations.of(generators([1]), 2**32 // 20) is None  # torch draws large n another way


def test_remainder_is_exact_at_the_edges():
    from modnets.permutations import _remainder

    y = np.array([0, 1, 2**32 - 1, 2**32 - 2, 4294967291, 3 * 214748364], dtype=np.uint32)
    for d in (1, 2, 3, 51, 2**31 - 1, 214748364):
        assert np.array_equal(_remainder(y, np.int64(d)), y.astype(np.int64) % d)
