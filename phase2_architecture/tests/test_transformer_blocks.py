"""Blocks == torch.nn.TransformerEncoderLayer / TransformerDecoderLayer (same weights, pre- and post-norm),
decoder-only blocks are causal, and the padding mask hides padded source tokens."""

import pytest
import torch
from torch import nn

from phase1_foundation.src.attention_mechanism import to_torch_multihead_attention
from phase2_architecture.src.transformer_blocks import (
    DecoderBlock,
    EncoderBlock,
    TransformerBlock,
    key_padding_to_attention_mask,
)

C, H, FF = 32, 4, 64


def copy_ffn_and_norms(ours, ref, norm_pairs):
    with torch.no_grad():
        ref.linear1.weight.copy_(ours.ffn.up_proj.weight)
        ref.linear1.bias.copy_(ours.ffn.up_proj.bias)
        ref.linear2.weight.copy_(ours.ffn.down_proj.weight)
        ref.linear2.bias.copy_(ours.ffn.down_proj.bias)
        for mine, theirs in norm_pairs:
            mine.weight.normal_()  # random gains/biases so the norms are really compared
            mine.bias.normal_()
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_block_matches_torch_encoder_layer(norm_first):
    torch.manual_seed(0)
    ours = EncoderBlock(C, H, d_ff=FF, norm_first=norm_first).double()
    ref = nn.TransformerEncoderLayer(
        C, H, FF, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first
    ).double()
    ref.self_attn = to_torch_multihead_attention(
        ours.attn
    )  # phase 1: our q/k/v/out weights in torch's module
    copy_ffn_and_norms(ours, ref, [(ours.ln1, ref.norm1), (ours.ln2, ref.norm2)])
    ref.train()  # dropout is 0; train mode keeps torch off its fused inference fast path
    x = torch.randn(3, 7, C, dtype=torch.float64)
    key_mask = torch.ones(3, 7, dtype=torch.bool)
    key_mask[1, 5:] = False  # sequence 1 has 2 padding tokens
    key_mask[2, 3:] = False
    out = ours(x, key_mask)
    expected = ref(x, src_key_padding_mask=~key_mask)  # torch: True = padding
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_block_matches_torch_decoder_layer(norm_first):
    torch.manual_seed(0)
    ours = DecoderBlock(C, H, d_ff=FF, norm_first=norm_first).double()
    ref = nn.TransformerDecoderLayer(
        C, H, FF, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first
    ).double()
    ref.self_attn = to_torch_multihead_attention(ours.self_attn)
    ref.multihead_attn = to_torch_multihead_attention(ours.cross_attn)
    copy_ffn_and_norms(ours, ref, [(ours.ln1, ref.norm1), (ours.ln2, ref.norm2), (ours.ln3, ref.norm3)])
    x = torch.randn(2, 6, C, dtype=torch.float64)
    memory = torch.randn(2, 9, C, dtype=torch.float64)
    mem_mask = torch.ones(2, 9, dtype=torch.bool)
    mem_mask[0, 6:] = False
    out = ours(x, memory, mem_mask)
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)  # -inf above diagonal
    expected = ref(x, memory, tgt_mask=causal, memory_key_padding_mask=~mem_mask)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm_first", [True, False])
def test_decoder_only_block_is_causal(norm_first):
    torch.manual_seed(0)
    block = TransformerBlock(C, H, norm_first=norm_first).eval()
    x = torch.randn(2, 10, C)
    y = x.clone()
    y[:, 6:] = torch.randn(2, 4, C)
    a, b = block(x), block(y)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_encoder_block_is_bidirectional_and_ignores_padding():
    torch.manual_seed(0)
    block = EncoderBlock(C, H).eval()
    x = torch.randn(1, 8, C)
    y = x.clone()
    y[:, 7] = torch.randn(C)  # change the last token
    assert (block(x)[:, 0] - block(y)[:, 0]).abs().max() > 1e-4  # the first token sees it
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[:, 7] = False  # ... unless it is padding
    torch.testing.assert_close(block(x, mask)[:, :7], block(y, mask)[:, :7], rtol=0, atol=1e-6)


def test_swiglu_rmsnorm_block_runs_and_keeps_shape():
    block = TransformerBlock(C, H, norm="rmsnorm", ffn="swiglu", bias=False)
    assert block(torch.randn(2, 5, C)).shape == (2, 5, C)


def test_key_padding_mask_errors():
    with pytest.raises(ValueError, match="bool tensor"):
        key_padding_to_attention_mask(torch.ones(2, 3))
    with pytest.raises(ValueError, match="all padding"):
        key_padding_to_attention_mask(torch.tensor([[True, False], [False, False]]))
