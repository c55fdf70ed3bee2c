"""The combine (sorted pair rows back to their tokens) works in blocks of COMBINE_ROWS tokens: with blocks
smaller than the batch, and a last block that is partial, it still equals index_add_ over the tokens,
weighted and unweighted, with dropped pairs; and the whole dispatch still equals the per-token reference."""

import pytest
import torch

from sparse_moe_transformer.src import moe_dispatch
from sparse_moe_transformer.src.moe_dispatch import _combine, expert_ffn, route_tokens
from sparse_moe_transformer.tests.test_expert_activations import per_token_reference, silu_gate_times_up


@pytest.mark.parametrize("block", [1, 5, 256])
@pytest.mark.parametrize("capacity", [None, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_blocked_combine_equals_index_add_over_tokens(monkeypatch, block, capacity, weighted):
    monkeypatch.setattr(moe_dispatch, "COMBINE_ROWS", block)
    torch.manual_seed(0)
    N, C, E, k = 23, 6, 5, 3  # 23 tokens: blocks of 5 leave a partial last block
    routing = route_tokens(torch.randn(N, E), k, capacity)
    M = routing.token_index.numel()
    rows, weight = torch.randn(M, C), torch.rand(M)
    if capacity is not None:
        assert routing.dropped > 0
    got = _combine(rows, routing.unsort_index, k, N, weight if weighted else None)
    scaled = rows * weight[:, None] if weighted else rows
    want = torch.zeros(N, C).index_add_(0, routing.token_index, scaled)
    torch.testing.assert_close(got, want)


def test_dispatch_with_small_combine_blocks_equals_the_per_token_reference(monkeypatch):
    monkeypatch.setattr(moe_dispatch, "COMBINE_ROWS", 7)
    torch.manual_seed(0)
    N, C, Fh, E, k = 30, 8, 6, 12, 4
    x = torch.randn(N, C, requires_grad=True)
    logits_w = torch.randn(C, E, requires_grad=True)
    g = torch.Generator().manual_seed(2)
    shapes = ((E, C, 2 * Fh), (E, 2 * Fh), (E, Fh, C), (E, C))
    ws = [(torch.randn(*s, generator=g) * 0.3).requires_grad_() for s in shapes]
    out = expert_ffn(x, *ws, route_tokens(x @ logits_w, k), "swiglu")
    ref = per_token_reference(x, x @ logits_w, *ws, k, silu_gate_times_up)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn(N, C)
    params = [x, logits_w, *ws]
    for got, want in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
