"""Load OpenAI's GPT-2 weights into the Phase 2 GPT.

The Phase 2 `GPT` is GPT-2's architecture, so the released weights fit it once five details of
their layout are translated:

    Hugging Face GPT2LMHeadModel              Phase 2 GPT                      what changes
    transformer.wte.weight    [V, C]          tok_emb.weight, lm_head.weight   tied: one matrix, two uses
    transformer.wpe.weight    [T, C]          pos_emb.weight                   -
    h.i.ln_1 / ln_2 / ln_f    weight, bias    blocks.i.ln1 / ln2, ln_f         LayerNorm, eps 1e-5 in both
    h.i.attn.c_attn.weight    [C, 3C]         attn.q_proj / k_proj / v_proj    fused qkv: split, transpose
    h.i.attn.c_proj.weight    [C, C]          attn.out_proj.weight             transpose
    h.i.mlp.c_fc.weight       [C, 4C]         ffn.up_proj.weight               transpose
    h.i.mlp.c_proj.weight     [4C, C]         ffn.down_proj.weight             transpose
    activation "gelu_new"                     GPTConfig(gelu_approximate="tanh")

"Transpose": GPT-2 was written in TensorFlow with `Conv1D` layers that compute y = x W + b with W
stored [in, out]; `nn.Linear` computes y = x W^T + b with W stored [out, in]. The fused c_attn
computes q, k and v in one matmul: its output columns are [q | k | v], C each, and within each the
heads sit side by side (head h owns columns h*Dh .. (h+1)*Dh - 1), which is exactly how Phase 1's
`split_heads` reads a [B, T, C] tensor, so a plain split in three is all it takes.

OpenAI's original TensorFlow checkpoint names the same tensors `model/h0/attn/c_attn/w` (shape
[1, C, 3C]: a 1-wide convolution), `model/h0/ln_1/g` (gain) and `/b`, `model/wte`, `model/wpe`;
`openai_to_hf_state_dict` renames and squeezes them into the Hugging Face layout.

    model = gpt2_to_gpt(hf_model)               # any GPT2LMHeadModel (e.g. built locally, random weights)
    model, tokenizer = load_pretrained_gpt2()   # the real "gpt2" (124M) from the Hugging Face hub

Run `python phase4_training/src/gpt2_weights.py --prompt "Once upon a time"` (internet once; or
`--model /path/to/saved/gpt2`) to generate with the real weights in our own GPT.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Mapping

import torch

from phase2_architecture.src.gpt import GPT, GPTConfig

# Hugging Face's names for the two GELU variants GPT-2 configs use.
GELU_APPROXIMATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
OUR_LAYER_NORM_EPS = 1e-5  # phase-2 LayerNorm's default, the same as GPT-2's layer_norm_epsilon


def gpt_config_from_hf(hf_config: Any) -> GPTConfig:
    """The GPTConfig of a transformers.GPT2Config, or a ValueError naming what we cannot reproduce."""
    activation = getattr(hf_config, "activation_function", "gelu_new")
    if activation not in GELU_APPROXIMATIONS:
        raise ValueError(
            f"GPT-2 config uses activation {activation!r}; "
            f"only {sorted(GELU_APPROXIMATIONS)} map to GPTConfig.gelu_approximate"
        )
    n_inner = getattr(hf_config, "n_inner", None)
    if n_inner not in (None, 4 * hf_config.n_embd):
        raise ValueError(f"GPT-2 config has n_inner={n_inner}; the Phase 2 GELU FFN has 4 * n_embd.")
    if abs(hf_config.layer_norm_epsilon - OUR_LAYER_NORM_EPS) > 1e-12:
        raise ValueError(
            f"GPT-2 config has layer_norm_epsilon={hf_config.layer_norm_epsilon}; the Phase 2 LayerNorm uses "
            f"{OUR_LAYER_NORM_EPS} (as every released GPT-2 does)."
        )
    if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False) or not getattr(
        hf_config, "scale_attn_weights", True
    ):
        raise ValueError("GPT-2 config changes the attention scale; the Phase 2 GPT uses 1 / sqrt(head_dim).")
    return GPTConfig(
        vocab_size=hf_config.vocab_size,
        block_size=hf_config.n_positions,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        d_model=hf_config.n_embd,
        dropout=0.0,
        bias=True,
        norm="layernorm",
        ffn="gelu",
        tie_weights=True,
        gelu_approximate=GELU_APPROXIMATIONS[activation],
    )


def convert_hf_state_dict(hf_state: Mapping[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel (or GPT2Model) state dict -> the Phase 2 GPT's state dict (tied lm_head)."""
    sd = {k.removeprefix("transformer."): v for k, v in hf_state.items()}  # GPT2Model has no prefix
    out = {
        "tok_emb.weight": sd["wte.weight"],  # [V, C]
        "pos_emb.weight": sd["wpe.weight"],  # [T, C]
        "ln_f.weight": sd["ln_f.weight"],
        "ln_f.bias": sd["ln_f.bias"],
        "lm_head.weight": sd["wte.weight"],  # tied: the output layer reads the token embedding
    }
    for i in range(n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        C = sd[h + "ln_1.weight"].shape[0]
        # fused qkv: Conv1D weight [C, 3C] -> three [C, C] column blocks -> transpose to [out, in]
        q_w, k_w, v_w = sd[h + "attn.c_attn.weight"].split(C, dim=1)  # 3 x [C, C]
        q_b, k_b, v_b = sd[h + "attn.c_attn.bias"].split(C, dim=0)  # 3 x [C]
        out.update(
            {
                b + "ln1.weight": sd[h + "ln_1.weight"],
                b + "ln1.bias": sd[h + "ln_1.bias"],
                b + "attn.q_proj.weight": q_w.t(),
                b + "attn.q_proj.bias": q_b,
                b + "attn.k_proj.weight": k_w.t(),
                b + "attn.k_proj.bias": k_b,
                b + "attn.v_proj.weight": v_w.t(),
                b + "attn.v_proj.bias": v_b,
                b + "attn.out_proj.weight": sd[h + "attn.c_proj.weight"].t(),  # [C, C] Conv1D -> Linear
                b + "attn.out_proj.bias": sd[h + "attn.c_proj.bias"],
                b + "ln2.weight": sd[h + "ln_2.weight"],
                b + "ln2.bias": sd[h + "ln_2.bias"],
                b + "ffn.up_proj.weight": sd[h + "mlp.c_fc.weight"].t(),  # [C, 4C] -> [4C, C]
                b + "ffn.up_proj.bias": sd[h + "mlp.c_fc.bias"],
                b + "ffn.down_proj.weight": sd[h + "mlp.c_proj.weight"].t(),  # [4C, C] -> [C, 4C]
                b + "ffn.down_proj.bias": sd[h + "mlp.c_proj.bias"],
            }
        )
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def gpt2_to_gpt(hf_model: Any) -> GPT:
    """A Phase 2 GPT computing the same logits as `hf_model` (a transformers GPT2LMHeadModel); eval mode."""
    config = gpt_config_from_hf(hf_model.config)
    with torch.device("meta"):  # shapes only: no time spent drawing random weights we overwrite next
        model = GPT(config)
    state = convert_hf_state_dict(hf_model.state_dict(), config.n_layer)
    model.load_state_dict(state, strict=True, assign=True)  # every key present, every shape right
    model.lm_head.weight = model.tok_emb.weight  # assign=True made two Parameters: tie them again
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise RuntimeError("a GPT tensor was not loaded from the GPT-2 state dict (still on the meta device)")
    return model.eval()


_OPENAI_NAME = re.compile(r"^model/(?:h(\d+)/)?(.+)$")


def openai_to_hf_state_dict(variables: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """OpenAI's TF checkpoint variables {"model/h0/attn/c_attn/w": array [1, C, 3C], ...} -> HF names.

    Read the variables with `tf.train.load_variable(checkpoint, name)` for every name of
    `tf.train.list_variables(checkpoint)` (as rasbt's `gpt_download.py` does). Renames:
    model/X -> transformer.X, hN -> h.N, `/` -> `.`, gain g -> weight, b -> bias, w -> weight;
    the convolution weights' leading width-1 axis is dropped.
    """
    out = {}
    for name, value in variables.items():
        match = _OPENAI_NAME.match(name)
        if match is None:
            raise ValueError(f"unexpected variable {name!r}: OpenAI GPT-2 checkpoints name them 'model/...'")
        layer, rest = match.groups()
        parts = rest.split("/")
        if parts[-1] in ("g", "w"):
            parts[-1] = "weight"
        elif parts[-1] == "b":
            parts[-1] = "bias"
        elif len(parts) == 1:  # wte, wpe
            parts.append("weight")
        prefix = "transformer." + (f"h.{layer}." if layer is not None else "")
        tensor = torch.as_tensor(value)
        if parts[-1] == "weight" and tensor.dim() == 3:  # Conv1D kernel [1, in, out] -> [in, out]
            tensor = tensor.squeeze(0)
        out[prefix + ".".join(parts)] = tensor
    return out


def load_pretrained_gpt2(name_or_path: str = "gpt2", cache_dir: str | None = None) -> tuple[GPT, Any]:
    """The released GPT-2 weights in our GPT, and the matching Hugging Face tokenizer.

    `name_or_path` is a hub name ("gpt2", "gpt2-medium", ...; needs internet the first time, then the
    Hugging Face cache) or a local folder written by `save_pretrained`. Offline with nothing cached, the
    error says so in one line.
    """
    from transformers import AutoTokenizer, GPT2LMHeadModel

    try:
        hf_model = GPT2LMHeadModel.from_pretrained(name_or_path, cache_dir=cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir)
    except OSError as error:  # offline, no cache, wrong name or path
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RuntimeError(
            f"could not load GPT-2 weights {name_or_path!r} ({first_line[:120]}); fix: connect to the "
            "internet once (and unset HF_HUB_OFFLINE) so Hugging Face can download and cache them, "
            "or pass a local folder saved with save_pretrained (--model /path/to/gpt2)"
        ) from None
    return gpt2_to_gpt(hf_model), tokenizer


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Generate with GPT-2's weights loaded into the Phase 2 GPT.")
    parser.add_argument("--model", default="gpt2", help="hub name or local save_pretrained folder")
    parser.add_argument("--prompt", default="Once upon a time", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: HF_HOME)")
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_pretrained_gpt2(args.model, cache_dir=args.cache_dir)
    except RuntimeError as error:
        parser.exit(1, f"error: {error}\n")
    idx = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long)  # [1, T]
    generator = torch.Generator().manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, generator=generator)
    text = tokenizer.decode(out[0].tolist())
    print(text)
    return text


if __name__ == "__main__":
    main()
