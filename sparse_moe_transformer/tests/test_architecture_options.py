"""The architecture options of the recipe (Config.pos="rope", qk_norm, zero_init_proj, logit_softcap,
expert_activation): causality and KV-cache equivalence with them on (the cache also with the preset as it
is), attention equal to its formula written out by hand, the defaults reproduce the original model, old
configs load."""

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from phase2_architecture.src.positional_encoding import apply_rope, rope_angles
from phase5_production.src.kv_cache import KVCache
from sparse_moe_transformer.src.param_counts import count_active_parameters, count_parameters
from sparse_moe_transformer.src.train import Config, SparseMoETransformer, preset_config

RECIPES = [
    dict(pos="rope"),
    dict(qk_norm=True),
    dict(pos="rope", qk_norm=True, logit_softcap=15.0),
    dict(pos="rope", qk_norm=True, expert_activation="relu2"),
]


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return SparseMoETransformer(preset_config("tiny", **overrides)).eval()


@pytest.mark.parametrize("options", RECIPES)
def test_causality_future_tokens_do_not_change_past_logits_with_the_new_options(options):
    model = tiny_model(**options)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (2, 20), generator=g)
    t = 9
    changed = ids.clone()
    changed[:, t + 1 :] = (ids[:, t + 1 :] + 1 + torch.randint(0, 90, (2, 10), generator=g)) % 97
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().amax() > 1e-3  # the later positions do change


@pytest.mark.parametrize("options", [{}, *RECIPES])  # {}: the preset as it is
@pytest.mark.parametrize("T", [1, 5])
def test_cached_forward_in_chunks_equals_full_forward(options, T):
    model = tiny_model(**options)
    ids = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config.n_layer, model.config.block_size)
        parts = [model(ids[:, i : i + T], cache=cache).logits for i in range(0, 15, T)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_generation_equals_recomputation_with_rope_and_qk_norm():
    model = tiny_model(pos="rope", qk_norm=True)
    prompt = torch.randint(0, 97, (2, 4))
    with_cache = model.generate(prompt, 12, temperature=0)
    assert torch.equal(with_cache, model.generate(prompt, 12, temperature=0, use_cache=False))


@pytest.mark.parametrize("start", [0, 6])
def test_attention_with_rope_and_qk_norm_equals_the_formula_written_out(start):
    """softmax(rope(rms(q)) rope(rms(k))^T / sqrt(Dh) + causal mask) v, projected; at positions start.."""
    model = tiny_model(pos="rope", qk_norm=True)
    attn = model.layers[0].attn
    B, T, C, H = 2, 7, model.config.d_model, model.config.n_head
    Dh = C // H
    x = torch.randn(B, start + T, C)
    q, k, v = (t.view(B, start + T, H, Dh).transpose(1, 2) for t in attn.qkv(x).split(C, dim=-1))
    rms = lambda z: z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + torch.finfo(z.dtype).eps)  # noqa: E731
    cos, sin = rope_angles(model.config.block_size, Dh)
    q, k = (
        apply_rope(rms(q), cos[: start + T], sin[: start + T]),
        apply_rope(rms(k), cos[: start + T], sin[: start + T]),
    )
    scores = q @ k.transpose(-2, -1) / math.sqrt(Dh)  # [B, H, S+T, S+T]
    scores = scores.masked_fill(
        ~torch.tril(torch.ones(start + T, start + T, dtype=torch.bool)), float("-inf")
    )
    expected = attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, start + T, C))[:, start:]
    with torch.no_grad():
        if start:  # the first `start` tokens go through the cache, the last T attend to them
            cache = KVCache(model.config.n_layer, model.config.block_size)
            attn(x[:, :start], cache, 0, 0)
            got = attn(x[:, start:], cache, 0, start)
        else:
            got = attn(x)
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)


def test_rope_model_has_no_position_table_and_the_parameter_counts_match():
    for options in [{}, *RECIPES]:
        model = tiny_model(**options)
        c = model.config
        assert hasattr(model, "pos_emb") == (c.pos == "learned")
        assert count_parameters(c) == sum(p.numel() for p in model.parameters())
        # RoPE tables are recomputed, not saved: the state dict holds parameters only
        assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}
    learned, rope = preset_config("tiny"), preset_config("tiny", pos="rope")
    assert count_active_parameters(learned, True) - count_active_parameters(rope, True) == learned.d_model


def test_logit_softcap_is_cap_times_tanh_of_the_uncapped_logits():
    plain, capped = tiny_model(seed=3), tiny_model(seed=3, logit_softcap=0.05)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        raw, out = plain(ids).logits, capped(ids).logits
    torch.testing.assert_close(out, 0.05 * torch.tanh(raw / 0.05), atol=1e-6, rtol=1e-6)
    assert out.abs().max() < 0.05 and raw.abs().max() > 0.05  # the cap is active here


def test_zero_init_proj_starts_every_layer_as_the_identity():
    model = tiny_model(zero_init_proj=True)
    for layer in model.layers:
        assert layer.attn.out_proj.weight.abs().max() == 0 and layer.moe.w2.abs().max() == 0
        x = torch.randn(2, 8, model.config.d_model)
        with torch.no_grad():
            y, _, _ = layer(x)
        torch.testing.assert_close(y, x, atol=0, rtol=0)
    default = tiny_model()
    assert default.layers[0].attn.out_proj.weight.abs().max() > 0  # the original init is unchanged
    # training moves them off zero: the expert outputs get a gradient at once
    model.train()
    ids = torch.randint(0, 97, (2, 10))
    model(ids, ids).loss.backward()
    assert (
        model.layers[0].moe.w2.grad.abs().max() > 0
        and model.layers[0].attn.out_proj.weight.grad.abs().max() > 0
    )


def test_default_config_is_the_original_model_and_old_configs_load():
    new_fields = ("pos", "qk_norm", "zero_init_proj", "logit_softcap", "expert_activation")
    saved = {k: v for k, v in asdict(preset_config("cpu-small")).items() if k not in new_fields}
    config = Config.from_saved(saved)  # a config written before the options existed
    assert config == Config(**saved)  # the options take their defaults: the original architecture
    assert (config.pos, config.qk_norm, config.zero_init_proj, config.logit_softcap) == (
        "learned",
        False,
        False,
        None,
    )
    # same seed, same weights, same logits as a model built without any option named
    a = tiny_model(seed=5)
    b = tiny_model(seed=5, pos="learned", qk_norm=False, zero_init_proj=False, logit_softcap=None)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert "pos_emb.weight" in a.state_dict() and a.layers[0].attn.rope is None


def test_bad_option_values_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="'learned' or 'rope'"):
        preset_config("tiny", pos="alibi")
    with pytest.raises(ValueError, match="must be even"):
        preset_config("tiny", d_model=36, n_head=4, pos="rope")  # head_dim 9
    with pytest.raises(ValueError, match="logit_softcap"):
        preset_config("tiny", logit_softcap=0.0)


def test_moe_routing_is_unchanged_by_the_attention_options():
    """Each token still activates exactly top_k experts, whose weights sum to 1, with every option on."""
    model = tiny_model(pos="rope", qk_norm=True, logit_softcap=15.0, zero_init_proj=True)
    with torch.no_grad():
        for p in model.parameters():  # move off the zero init so routing sees real inputs
            p.add_(0.02 * torch.randn_like(p))
        out = model(torch.randint(0, 97, (2, 12)))
    for routing in out.routing:
        assert routing.topk_index.shape == (24, model.config.top_k)
        assert (routing.topk_index.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts per token
        torch.testing.assert_close(routing.topk_weight.sum(-1), torch.ones(24))
        assert int(routing.routed_counts.sum()) == 24 * model.config.top_k
    assert F.softmax(out.logits, -1).isfinite().all()
