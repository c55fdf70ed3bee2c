"""GPT: interface, parameter-count formula, causality, loss, GPT-2 initialisation, generation, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from phase1_foundation.src.attention_mechanism import MultiHeadAttention
from phase2_architecture.src.gpt import GPT, GPTConfig, gpt_parameter_count


def tiny_config(**overrides):
    base = dict(vocab_size=37, block_size=16, n_layer=2, n_head=2, d_model=32)
    base.update(overrides)
    return GPTConfig(**base)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"bias": False},
        {"tie_weights": True},
        {"n_layer": 3, "n_head": 4, "d_model": 64, "vocab_size": 100, "block_size": 40},
        {"norm": "rmsnorm", "ffn": "swiglu"},
        {"norm": "rmsnorm", "ffn": "swiglu", "bias": False, "tie_weights": True, "d_model": 96, "n_head": 3},
    ],
)
def test_parameter_count_formula_matches_module(overrides):
    config = tiny_config(**overrides)
    model = GPT(config)
    assert gpt_parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_parameter_count_of_gpt2_small_is_the_published_124m():
    # GPT-2 small (tied embeddings) has 124,439,808 parameters (nanoGPT, HF "gpt2").
    gpt2 = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768, tie_weights=True)
    assert gpt_parameter_count(gpt2) == 124_439_808


def test_interface_attribute_names():
    model = GPT(tiny_config())
    assert isinstance(model.tok_emb, torch.nn.Embedding) and isinstance(model.pos_emb, torch.nn.Embedding)
    assert isinstance(model.drop, torch.nn.Dropout)
    assert len(model.blocks) == 2
    for block in model.blocks:
        assert isinstance(block.attn, MultiHeadAttention)
        assert block.ln1 is not None and block.ln2 is not None and block.ffn is not None
    assert model.lm_head.weight.shape == (37, 32)
    assert model.ln_f.weight.shape == (32,)
    tied = GPT(tiny_config(tie_weights=True))
    assert tied.lm_head.weight is tied.tok_emb.weight


def test_forward_shapes_and_loss_equals_cross_entropy():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 37, (3, 16))
    targets = torch.randint(0, 37, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 37) and loss is None
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits.reshape(-1, 37), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)
    # A freshly initialised model predicts roughly uniformly: loss ~ ln(V).
    assert abs(loss.item() - math.log(37)) < 0.15


def test_loss_ignores_minus_100_targets():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 37, (2, 10))
    targets = torch.randint(0, 37, (2, 10))
    masked = targets.clone()
    masked[0, 5:] = -100
    masked[1, :3] = -100
    logits, loss = model(idx, masked)
    keep = masked != -100
    expected = F.cross_entropy(logits[keep], targets[keep])  # mean over the scored positions only
    torch.testing.assert_close(loss, expected)
    assert not torch.isclose(loss, F.cross_entropy(logits.reshape(-1, 37), targets.reshape(-1)))


@pytest.mark.parametrize(
    "variant", [{}, {"norm": "rmsnorm", "ffn": "swiglu", "tie_weights": True, "bias": False}]
)
def test_causality_future_tokens_do_not_change_past_logits(variant):
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=3, **variant)).eval()
    idx = torch.randint(0, 37, (2, 16))
    t = 6
    changed = idx.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.randint(0, 35, changed[:, t + 1 :].shape)) % 37
    assert (changed[:, t + 1 :] != idx[:, t + 1 :]).all()
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().amax(dim=-1).min() > 1e-4  # every later position changes


def test_gpt2_initialisation_statistics():
    torch.manual_seed(0)
    config = tiny_config(n_layer=8, d_model=128, n_head=4, vocab_size=500, block_size=64)
    model = GPT(config)
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    for block in model.blocks:
        assert abs(block.attn.out_proj.weight.std().item() - residual_std) < 0.1 * residual_std
        assert abs(block.ffn.down_proj.weight.std().item() - residual_std) < 0.1 * residual_std
        assert torch.all(block.attn.q_proj.bias == 0)
        assert torch.all(block.ln1.weight == 1)


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    model = GPT(tiny_config(dropout=0.3))
    idx = torch.randint(0, 37, (2, 8))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_generate_greedy_matches_repeated_argmax_over_the_last_block_size_tokens():
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=8)).train()
    prompt = torch.randint(0, 37, (2, 10))  # longer than block_size: the window slides from the start
    out = model.generate(prompt, 5, temperature=0.0)
    assert out.shape == (2, 15) and torch.equal(out[:, :10], prompt)
    assert model.training  # mode restored
    model.eval()
    seq = prompt
    for _ in range(5):
        logits, _ = model(seq[:, -8:])  # positions 0..7, the ones the model was trained on
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert torch.equal(model.generate(prompt, 5, top_k=1), seq)  # top-1 sampling is greedy


def test_generate_stops_at_eos_and_finished_rows_repeat_it():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    prompt = torch.randint(0, 37, (2, 2), generator=torch.Generator().manual_seed(4))
    greedy = model.generate(prompt, 10, temperature=0)
    eos = int(greedy[0, 5])  # row 0 produces it at step 4 at the latest
    out = model.generate(prompt, 10, temperature=0, eos_token_id=eos)
    # the step at which each row first produced EOS (9 = the last step, for a row that never did)
    steps = [int(f[0]) if len(f) else 9 for f in ((row[2:] == eos).nonzero() for row in greedy)]
    assert steps[0] <= 3
    assert out.shape == (2, 2 + max(steps) + 1)  # stopped once every row had produced EOS
    for row, step in enumerate(steps):
        end = 2 + step + 1
        assert torch.equal(out[row, :end], greedy[row, :end])  # identical until its EOS
        assert (out[row, end:] == eos).all()  # then EOS only
    alone = model.generate(prompt[:1], 10, temperature=0, eos_token_id=eos)
    assert torch.equal(alone, greedy[:1, : 2 + steps[0] + 1])  # one row: stops right after its EOS
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(prompt, 2, eos_token_id=37)


def test_generate_sampling_is_reproducible_with_generator_and_respects_top_k():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    prompt = torch.zeros(4, 1, dtype=torch.long)
    a = model.generate(prompt, 12, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # with top_k=3 every sampled token is among the 3 most likely at its step
    out = model.generate(prompt, 6, top_k=3, generator=torch.Generator().manual_seed(1))
    logits, _ = model(out[:, :-1])
    top3 = logits.topk(3, dim=-1).indices  # [B, T, 3]
    assert (top3 == out[:, 1:, None]).any(-1).all()


def test_bad_inputs_raise_clear_errors():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 36\]"):
        model(torch.full((1, 4), 37, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 4), -1, dtype=torch.long))
    with pytest.raises(TypeError, match="LongTensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="targets"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), 40, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, top_k=0)
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(vocab_size=10, block_size=8, d_model=30, n_head=4)
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig(vocab_size=0, block_size=8)
    with pytest.raises(ValueError, match="norm"):
        GPTConfig(vocab_size=10, block_size=8, norm="batchnorm")


def test_gelu_approximate_tanh_uses_gpt2_gelu_in_every_block_and_changes_the_output():
    # GPT-2 was trained with the tanh approximation of GELU; the default stays the exact erf GELU.
    torch.manual_seed(0)
    exact = GPT(tiny_config())
    tanh = GPT(tiny_config(gelu_approximate="tanh"))
    tanh.load_state_dict(exact.state_dict())  # same weights, only the activation differs
    for block in exact.blocks:
        x = torch.randn(50) * 3
        assert torch.allclose(block.ffn.act(x), F.gelu(x), atol=1e-6)
    for block in tanh.blocks:
        x = torch.randn(50) * 3
        assert torch.allclose(block.ffn.act(x), F.gelu(x, approximate="tanh"), atol=1e-6)
        assert not torch.allclose(block.ffn.act(x), F.gelu(x), atol=1e-5)
    with pytest.raises(ValueError, match="gelu_approximate"):
        tiny_config(gelu_approximate="fast")
    with pytest.raises(ValueError, match="ffn='gelu' only"):
        tiny_config(ffn="swiglu", gelu_approximate="tanh")
