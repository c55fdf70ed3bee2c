"""GPT-2 weights in the Phase 2 GPT: same logits and same greedy text as Hugging Face's GPT-2.

No download: every GPT2LMHeadModel here is built locally with random weights. Hugging Face's own
initialisation leaves LayerNorm gains at 1 and every bias at 0, and its small weights keep GELU's
inputs where exact and tanh GELU agree; `scramble` draws every parameter at random and large enough
that a missing bias, an untransposed matrix, a swapped q/k or the wrong GELU all show in the logits.
"""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from phase2_architecture.src.gpt import GPT, gpt_parameter_count
from phase4_training.src import gpt2_weights
from phase4_training.src.gpt2_weights import (
    convert_hf_state_dict,
    gpt2_to_gpt,
    gpt_config_from_hf,
    load_pretrained_gpt2,
    openai_to_hf_state_dict,
)


def small_hf_gpt2(seed=0, **overrides):
    torch.manual_seed(seed)
    # no end-of-text id: Hugging Face's generate would stop there, ours always writes max_new_tokens
    config = dict(
        vocab_size=101, n_positions=32, n_embd=48, n_layer=3, n_head=4, bos_token_id=None, eos_token_id=None
    )
    config.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**config)).eval()


@torch.no_grad()
def scramble(hf_model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for name, p in hf_model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if "ln" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.3 * noise)  # gains around 1
        else:
            p.copy_(0.3 * noise)  # weights and biases, large enough to reach GELU's curved region
    return hf_model


def hf_greedy(hf_model, idx, max_new_tokens):
    """Hugging Face's own greedy generation (every prompt token attended, even one equal to the pad id)."""
    return hf_model.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


def hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(idx).logits


def test_small_converted_model_gives_hf_logits():
    hf = scramble(small_hf_gpt2())
    ours = gpt2_to_gpt(hf)
    idx = torch.randint(0, 101, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, _ = ours(idx)
    reference = hf_logits(hf, idx)
    assert reference.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(ours_logits, reference, atol=1e-4, rtol=1e-5)


def test_small_converted_model_gives_hf_greedy_generation():
    hf = scramble(small_hf_gpt2(seed=2), seed=2)
    ours = gpt2_to_gpt(hf)
    prompt = torch.tensor([[5, 17, 42, 8]])
    ours_out = ours.generate(prompt, max_new_tokens=12, temperature=0)
    hf_out = hf_greedy(hf, prompt, 12)
    assert ours_out.tolist() == hf_out.tolist()
    assert len(set(ours_out[0, 4:].tolist())) > 1  # not a constant sequence that any model might produce


def test_exact_gelu_would_not_match_gpt2():
    # The converter must select the tanh approximation: the same weights with exact GELU disagree.
    hf = scramble(small_hf_gpt2())
    ours = gpt2_to_gpt(hf)
    config = gpt_config_from_hf(hf.config)
    config.gelu_approximate = "none"
    exact = GPT(config)
    exact.load_state_dict(ours.state_dict())
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        diff = (exact.eval()(idx)[0] - hf_logits(hf, idx)).abs().max()
    assert diff > 1e-3


def test_full_124m_configuration_matches_hf_and_the_parameter_formula():
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # the 124M GPT-2 small architecture, random weights
    ours = gpt2_to_gpt(hf)
    assert gpt_parameter_count(ours.config) == 124_439_808
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters()) == 124_439_808
    assert ours.lm_head.weight is ours.tok_emb.weight
    idx = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931]])  # any 8 ids < 50257
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf_logits(hf, idx), atol=1e-5, rtol=1e-5)  # measured ~2e-6
    ours_out = ours.generate(idx, max_new_tokens=3, temperature=0)
    hf_out = hf.generate(idx, max_new_tokens=3, do_sample=False, pad_token_id=50256)
    assert ours_out.tolist() == hf_out.tolist()


def test_conv1d_weights_are_transposed_and_qkv_split_in_order():
    hf = small_hf_gpt2()
    state = convert_hf_state_dict(hf.state_dict(), n_layer=3)
    c_attn = hf.transformer.h[1].attn.c_attn.weight  # [C, 3C]
    C = 48
    assert torch.equal(state["blocks.1.attn.q_proj.weight"], c_attn[:, :C].T)
    assert torch.equal(state["blocks.1.attn.k_proj.weight"], c_attn[:, C : 2 * C].T)
    assert torch.equal(state["blocks.1.attn.v_proj.weight"], c_attn[:, 2 * C :].T)
    assert torch.equal(state["blocks.1.ffn.up_proj.weight"], hf.transformer.h[1].mlp.c_fc.weight.T)
    assert torch.equal(state["lm_head.weight"], hf.transformer.wte.weight)


def test_openai_checkpoint_layout_converts_to_the_same_model():
    # OpenAI's TF names and shapes, built from a HF model: model/h0/attn/c_attn/w [1, C, 3C], ln gain g.
    hf = scramble(small_hf_gpt2(n_layer=2), seed=3)
    variables = {}
    for name, value in hf.state_dict().items():
        if not name.startswith("transformer.") or name.endswith((".attn.bias", ".masked_bias")):
            continue
        # "transformer.h.0.attn.c_attn.weight" -> ["h", "0", "attn", "c_attn"], "weight"
        *modules, kind = name.removeprefix("transformer.").split(".")
        if modules[0] == "h":
            modules = [f"h{modules[1]}"] + modules[2:]
        value = value.numpy()
        if modules[-1] in ("wte", "wpe"):
            variables["model/" + modules[-1]] = value
            continue
        if kind == "weight":
            kind = "g" if modules[-1].startswith("ln") else "w"
            if kind == "w":
                value = value[None]  # TF Conv1D kernels carry a width-1 axis
        else:
            kind = "b"
        variables["model/" + "/".join(modules + [kind])] = value
    assert "model/h1/attn/c_attn/w" in variables and variables["model/h1/attn/c_attn/w"].shape == (1, 48, 144)
    assert "model/ln_f/g" in variables and "model/wte" in variables
    state = convert_hf_state_dict(openai_to_hf_state_dict(variables), n_layer=2)
    ours = GPT(gpt_config_from_hf(hf.config))
    ours.load_state_dict(state)
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx)[0], hf_logits(hf, idx), atol=1e-4, rtol=1e-5)


def test_configs_we_cannot_reproduce_are_clear_errors():
    with pytest.raises(ValueError, match="activation"):
        gpt_config_from_hf(GPT2Config(activation_function="relu"))
    with pytest.raises(ValueError, match="layer_norm_epsilon"):
        gpt_config_from_hf(GPT2Config(layer_norm_epsilon=1e-6))
    with pytest.raises(ValueError, match="n_inner"):
        gpt_config_from_hf(GPT2Config(n_inner=100))
    with pytest.raises(ValueError, match="model/"):
        openai_to_hf_state_dict({"wte": torch.zeros(2, 2)})


def test_offline_loading_fails_with_one_line_error_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as info:
        load_pretrained_gpt2("gpt2", cache_dir=str(tmp_path))  # an empty cache: nothing to fall back on
    message = str(info.value)
    assert "\n" not in message
    assert "connect to the internet" in message and "local folder" in message


def test_loading_a_local_folder_and_the_cli(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A word-level tokenizer over 101 ids and a small GPT-2, saved the way save_pretrained writes them.
    words = ["the", "cat", "sat", "on", "mat"] + [f"w{i}" for i in range(95)] + ["[UNK]"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path)
    hf = scramble(small_hf_gpt2())
    hf.save_pretrained(tmp_path)

    model, tokenizer = load_pretrained_gpt2(str(tmp_path))
    idx = torch.tensor([tokenizer.encode("the cat sat")])
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf_logits(hf, idx), atol=1e-4, rtol=1e-5)
    text = gpt2_weights.main(["--model", str(tmp_path), "--prompt", "the cat sat", "--max-new-tokens", "5"])
    expected = hf_greedy(hf, idx, 5)
    assert text == tokenizer.decode(expected[0].tolist())
    assert capsys.readouterr().out.strip() == text


def test_cli_offline_exits_with_the_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        gpt2_weights.main(["--prompt", "Hello", "--cache-dir", str(tmp_path)])  # conftest: HF_HUB_OFFLINE=1
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not load GPT-2 weights 'gpt2'") and "\n" not in err
