"""Encoder-decoder transformer: shapes, causal decoder, the source reaches the decoder through
cross-attention, source padding is ignored, and it can learn a sequence-to-sequence task."""

import pytest
import torch

from phase2_architecture.src.encoder_decoder import EncoderDecoderConfig, EncoderDecoderTransformer


def make_model(**overrides):
    args = dict(src_vocab_size=20, tgt_vocab_size=15, block_size=16, n_layer=2, n_head=2, d_model=32)
    args.update(overrides)
    torch.manual_seed(0)
    return EncoderDecoderTransformer(EncoderDecoderConfig(**args)).eval()


@pytest.mark.parametrize("norm_first", [False, True])
def test_shapes_and_loss(norm_first):
    model = make_model(norm_first=norm_first)
    src, tgt = torch.randint(0, 20, (3, 9)), torch.randint(0, 15, (3, 7))
    logits, loss = model(src, tgt, targets=tgt)
    assert logits.shape == (3, 7, 15) and loss.ndim == 0 and torch.isfinite(loss)
    assert model.encode(src).shape == (3, 9, 32)


def test_decoder_is_causal():
    model = make_model()
    src, tgt = torch.randint(0, 20, (2, 9)), torch.randint(0, 15, (2, 8))
    changed = tgt.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 15
    a, _ = model(src, tgt)
    b, _ = model(src, changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-6)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-4


def test_encoder_output_reaches_every_target_position_through_cross_attention():
    model = make_model()
    src, tgt = torch.randint(0, 20, (2, 9)), torch.randint(0, 15, (2, 8))
    other_src = src.clone()
    other_src[:, -1] = (other_src[:, -1] + 1) % 20  # change only the LAST source token
    a, _ = model(src, tgt)
    b, _ = model(other_src, tgt)
    assert (a - b).abs().amax(dim=-1).min() > 1e-5  # even target position 0 sees the whole source
    # Zero the cross-attention output projections: the source no longer matters.
    with torch.no_grad():
        for block in model.decoder:
            block.cross_attn.out_proj.weight.zero_()
            block.cross_attn.out_proj.bias.zero_()
    torch.testing.assert_close(model(src, tgt)[0], model(other_src, tgt)[0])


def test_source_padding_is_ignored_via_mask_or_pad_id():
    model = make_model(pad_id=0)
    src = torch.randint(1, 20, (2, 9))
    src[0, 6:] = 0  # 3 padding tokens
    tgt = torch.randint(0, 15, (2, 5))
    other = src.clone()
    other[0, 6:] = torch.tensor([4, 5, 6])  # different tokens where the padding was ...
    explicit = src != 0
    a = model(src, tgt)[0]
    b = model(other, tgt, src_key_mask=explicit)[0]  # ... but still masked out
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # Padding at the end must not change the result for the real tokens.
    short = model(src[:1, :6], tgt[:1])[0]
    torch.testing.assert_close(a[:1], short, rtol=0, atol=1e-5)


def test_learns_to_reverse_a_fixed_batch_and_greedy_decodes_it():
    torch.manual_seed(0)
    model = make_model(src_vocab_size=12, tgt_vocab_size=12, n_layer=1, d_model=32).train()
    BOS = 11
    src = torch.randint(1, 11, (8, 6))
    rev = src.flip(1)
    tgt_in = torch.cat([torch.full((8, 1), BOS), rev[:, :-1]], dim=1)  # teacher forcing input
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(src, tgt_in, targets=rev)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    decoded = model.greedy_decode(src, BOS, max_new_tokens=6)
    assert torch.equal(decoded[:, 1:], rev)


def test_bad_inputs():
    model = make_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"src ids must be in \[0, 19\]"):
        model(torch.full((1, 3), 20), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="shape of src"):
        model(
            torch.zeros(1, 3, dtype=torch.long),
            torch.zeros(1, 3, dtype=torch.long),
            src_key_mask=torch.ones(1, 4, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="divisible"):
        EncoderDecoderConfig(src_vocab_size=5, tgt_vocab_size=5, d_model=30, n_head=4)
