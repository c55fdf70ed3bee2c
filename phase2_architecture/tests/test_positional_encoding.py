"""Sinusoidal table == the paper's formula; RoPE == complex rotation, keeps norms, scores depend on i - j."""

import math

import pytest
import torch
from torch import nn

from phase2_architecture.src.positional_encoding import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    apply_rope,
    rope_angles,
    sinusoidal_encoding,
)


def test_sinusoidal_matches_paper_formula():
    T, C = 50, 16
    pe = sinusoidal_encoding(T, C)
    assert pe.shape == (T, C)
    for pos in (0, 1, 7, 49):
        for i in range(C // 2):
            angle = pos / 10000 ** (2 * i / C)
            assert math.isclose(pe[pos, 2 * i].item(), math.sin(angle), abs_tol=1e-5)
            assert math.isclose(pe[pos, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-5)


def test_sinusoidal_offset_is_a_fixed_rotation():
    """PE[pos + k] = R_k PE[pos] with R_k independent of pos: what lets a model attend by relative offset."""
    pe = sinusoidal_encoding(64, 8).double()
    k = 5
    # Solve R from positions 0..31, check it on 32..58.
    R = torch.linalg.lstsq(pe[0:32], pe[k : 32 + k]).solution  # [C, C]
    torch.testing.assert_close(pe[32:59] @ R, pe[32 + k : 59 + k], atol=1e-4, rtol=0)


def test_sinusoidal_module_adds_table_and_checks_length():
    module = SinusoidalPositionalEncoding(10, 6)
    x = torch.randn(2, 4, 6)
    torch.testing.assert_close(module(x), x + sinusoidal_encoding(10, 6)[:4])
    assert len(list(module.parameters())) == 0
    with pytest.raises(ValueError, match="exceeds block_size 10"):
        module(torch.randn(1, 11, 6))
    with pytest.raises(ValueError, match="even"):
        sinusoidal_encoding(4, 7)


def test_learned_embedding_is_an_embedding_with_length_check():
    emb = LearnedPositionalEmbedding(8, 4)
    assert isinstance(emb, nn.Embedding)
    torch.testing.assert_close(emb.positions(3, offset=2), emb.weight[2:5])
    with pytest.raises(ValueError, match="larger block_size"):
        emb.positions(9)


def test_apply_rope_equals_complex_multiplication():
    torch.manual_seed(0)
    B, H, T, Dh = 2, 3, 11, 8
    x = torch.randn(B, H, T, Dh, dtype=torch.float64)
    # Independent reference angles, in float64: angle[pos, i] = pos * 10000^(-2i/Dh)
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    i = torch.arange(Dh // 2, dtype=torch.float64)[None, :]
    angles = pos * 10000 ** (-2 * i / Dh)  # [T, Dh/2]
    cos, sin = rope_angles(T, Dh)
    torch.testing.assert_close(cos.double(), torch.cos(angles), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double(), torch.sin(angles), atol=1e-6, rtol=0)
    z = torch.view_as_complex(x.reshape(B, H, T, Dh // 2, 2).contiguous())  # pairs as complex numbers
    rotated = z * torch.polar(torch.ones_like(angles), angles)  # z * e^{j pos theta_i}
    expected = torch.view_as_real(rotated).reshape(B, H, T, Dh)
    torch.testing.assert_close(apply_rope(x, torch.cos(angles), torch.sin(angles)), expected)


def test_rope_preserves_norms_and_position_zero_is_identity():
    rope = RotaryEmbedding(16, 32)
    x = torch.randn(4, 32, 16)
    y = rope(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:, 0], x[:, 0])
    assert not torch.allclose(y[:, 1:], x[:, 1:])


def test_rope_score_depends_only_on_relative_position():
    torch.manual_seed(0)
    Dh, block_size = 32, 128
    rope = RotaryEmbedding(Dh, block_size)
    q, k = torch.randn(Dh, dtype=torch.float64), torch.randn(Dh, dtype=torch.float64)

    def score(i, j):
        qi = rope(q.float()[None].expand(block_size, Dh).clone())[i].double()  # q placed at position i
        kj = rope(k.float()[None].expand(block_size, Dh).clone())[j].double()  # k placed at position j
        return (qi @ kj).item()

    for i, j, shift in [(5, 2, 10), (3, 9, 50), (0, 0, 100), (40, 7, 60)]:
        assert math.isclose(score(i, j), score(i + shift, j + shift), rel_tol=1e-4, abs_tol=1e-4)
    # ... and it does depend on the offset
    assert abs(score(5, 2) - score(5, 4)) > 1e-2


def test_rope_offset_matches_slice_of_full_sequence():
    rope = RotaryEmbedding(8, 20)
    x = torch.randn(2, 20, 8)
    full = rope(x)
    torch.testing.assert_close(rope(x[:, 12:15], offset=12), full[:, 12:15])
    with pytest.raises(ValueError, match="larger block_size"):
        rope(x[:, :5], offset=16)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7, 10)
