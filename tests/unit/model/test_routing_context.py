"""RoutingContext helpers."""

from __future__ import annotations

import torch

from uniperceiver_cli.model.routing import RoutingContext, input_segments


def test_with_prefix_keeps_padding_and_widens_it() -> None:
    segs = input_segments("mlm", text_len=3)
    padding = torch.tensor([[False, False, True, True], [False, False, False, False]])
    ctx = RoutingContext("toy", segs, padding)
    grown = ctx.with_prefix(2)
    assert grown.length == ctx.length + 2
    assert grown.padding is not None
    assert grown.padding.shape == (2, 6)
    assert not grown.padding[:, :2].any()
    assert torch.equal(grown.padding[:, 2:], padding)
    assert ctx.with_prefix(0) is ctx
