"""The two-stream caption mask of SPEC §1.10.4, checked cell by cell against the written rules."""

from __future__ import annotations

import pytest

from uniperceiver_cli.model.layers import caption_attention_mask


def rule(row: int, col: int, a: int, n: int) -> bool:
    """May position `row` attend to `col`? (SPEC §1.10.4, written independently of the implementation)."""
    if col < a:
        return True  # everyone sees SPE + visual
    if row < a:
        return False  # SPE/visual rows see no text
    row_is_w, col_is_w = row < a + n, col < a + n
    i = row - a if row_is_w else row - a - n
    j = col - a if col_is_w else col - a - n
    if row_is_w:
        return col_is_w and j <= i  # w_i sees w_j, j <= i; no s
    if col_is_w:
        return j < i  # s_i sees strictly earlier words
    return i == j  # among s only itself


@pytest.mark.parametrize(("a", "n"), [(1, 1), (5, 8), (3, 4), (1, 0)])
def test_caption_mask_every_cell(a: int, n: int) -> None:
    mask = caption_attention_mask(a, n)
    total = a + 2 * n
    assert mask.shape == (total, total)
    assert mask.dtype.is_floating_point is False
    for r in range(total):
        for c in range(total):
            assert bool(mask[r, c]) == rule(r, c, a, n), (r, c)


def test_caption_mask_known_rows() -> None:
    # a = 2 (SPE + 1 patch), n = 3: columns [S, p, w1, w2, w3, s1, s2, s3]
    m = caption_attention_mask(2, 3).int().tolist()
    assert m[0] == [1, 1, 0, 0, 0, 0, 0, 0]
    assert m[3] == [1, 1, 1, 1, 0, 0, 0, 0]  # w2
    assert m[5] == [1, 1, 0, 0, 0, 1, 0, 0]  # s1: image only
    assert m[7] == [1, 1, 1, 1, 0, 0, 0, 1]  # s3: w1, w2 and itself
