"""The memory plan for the expert options: SwiGLU experts, shared experts and fine-grained shapes
(more experts, a larger top_k, a smaller d_ff).

The MoE FFN block (gate, routing, the sorted expert dispatch and the dense shared experts of
moe_dispatch.py, wired as SparseMoEFFN wires them) saves, to the byte, what the plan's
`sparse_ffn_bytes_per_token` and its autocast weight copies say, in fp32, bf16 and fp16, for every
activation, with 0, 1 and 2 shared experts, at a coarse and a fine-grained shape. The whole model
(today's Config: GELU and ReLU^2) is held to the byte at a fine-grained shape, and `plan_memory`
on a Config-like object with the options adds exactly the block's measured difference per layer.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sparse_moe_transformer.src.memory_plan import (
    expert_parameter_count,
    measure_saved_bytes,
    plan_memory,
    shared_expert_parameter_count,
    sparse_ffn_bytes_per_token,
)
from sparse_moe_transformer.src.moe_dispatch import dense_ffn, expert_ffn, route_tokens
from sparse_moe_transformer.src.train import SparseMoETransformer, preset_config

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COARSE = dict(n_expert=8, top_k=2, d_ff=32)
FINE = dict(n_expert=32, top_k=8, d_ff=8)  # 4x the experts, 4x top_k, d_ff / 4: equal active size


def block_config(shape, activation, n_shared, C=16):
    """A Config-like object with the fields the plan reads, the expert options among them."""
    return SimpleNamespace(d_model=C, n_head=2, vocab_size=64, n_layer=2, block_size=32, dropout=0.0,
                           attn_dropout=None, expert_activation=activation, n_shared_expert=n_shared,
                           **shape)  # fmt: skip


def block_weights(cfg, seed=0):
    """The MoE FFN's parameters: gate [C, E] + [E], routed experts stacked, shared experts as one FFN."""
    g = torch.Generator().manual_seed(seed)
    C, E, Fh, S = cfg.d_model, cfg.n_expert, cfg.d_ff, cfg.n_shared_expert
    F1 = 2 * Fh if cfg.expert_activation == "swiglu" else Fh
    shapes = {
        "gate_w": (E, C),
        "gate_b": (E,),
        "w1": (E, C, F1),
        "b1": (E, F1),
        "w2": (E, Fh, C),
        "b2": (E, C),
    }
    if S:
        shapes.update(sw1=(C, S * F1), sb1=(S * F1,), sw2=(S * Fh, C), sb2=(C,))
    return {n: torch.nn.Parameter(torch.randn(*s, generator=g) * 0.2) for n, s in shapes.items()}


def block_forward(cfg, p, x):
    """What SparseMoEFFN.forward computes: gate, route, routed experts, plus the shared experts."""
    with torch.autocast(x.device.type, enabled=False):  # the router: fp32 whatever the autocast dtype
        logits = F.linear(x.float(), p["gate_w"], p["gate_b"])  # [N, E] fp32
    routing = route_tokens(logits, cfg.top_k)
    out = expert_ffn(x, p["w1"], p["b1"], p["w2"], p["b2"], routing, cfg.expert_activation)
    if cfg.n_shared_expert:
        out = out + dense_ffn(x, p["sw1"], p["sb1"], p["sw2"], p["sb2"], cfg.expert_activation)
    return out


def saved_bytes(fn, params) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while fn() runs."""
    param_storages = {q.untyped_storage().data_ptr() for q in params}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def measured_block(cfg, precision, N=48):
    p = block_weights(cfg)
    # the block's input is a LayerNorm's output: fp32 in every precision, and part of the graph
    x = torch.randn(N, cfg.d_model, generator=torch.Generator().manual_seed(1)).requires_grad_()
    dtype = DTYPES[precision]
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)

    outputs = []

    def run():
        with autocast:
            outputs.append(block_forward(cfg, p, x))

    nbytes = saved_bytes(run, list(p.values()))
    assert outputs[0].shape == x.shape and torch.isfinite(outputs[0].detach()).all()
    return nbytes


@pytest.mark.parametrize("shape", [COARSE, FINE], ids=["coarse", "fine-grained"])
@pytest.mark.parametrize("n_shared", [0, 1, 2])
@pytest.mark.parametrize("activation", ["gelu", "relu2", "swiglu"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_moe_ffn_block_saves_what_the_plan_says_to_the_byte(shape, n_shared, activation, precision):
    cfg = block_config(shape, activation, n_shared)
    N = 48
    a = 4 if precision == "fp32" else 2
    C, E, Fh, S = cfg.d_model, cfg.n_expert, cfg.d_ff, n_shared
    F1 = 2 * Fh if activation == "swiglu" else Fh
    # autocast copies of the matmul weights, written out from the shapes: gate, routed w1 and w2, shared
    copies = 0 if a == 4 else a * (E * C * (F1 + Fh) + S * C * (F1 + Fh))  # the fp32 router's: none
    want = N * sparse_ffn_bytes_per_token(cfg, a, on_gpu=False) + copies
    assert measured_block(cfg, precision, N) == want


def test_the_options_change_the_plan_by_the_measured_block_difference_per_layer():
    """plan_memory composes the block's bytes: swapping GELU experts for SwiGLU ones with 2 shared experts
    adds L x (the measured block difference, weight casts included)."""
    base, opts = block_config(FINE, "gelu", 0), block_config(FINE, "swiglu", 2)
    B, T = 2, 24  # 48 tokens, as measured_block
    for precision in ("fp32", "bf16"):
        plans = [
            plan_memory(c, B, T, n_params=10**6, precision=precision, on_gpu=False) for c in (base, opts)
        ]
        per_layer = measured_block(opts, precision) - measured_block(base, precision)
        assert plans[1].saved_for_backward - plans[0].saved_for_backward == base.n_layer * per_layer


@pytest.mark.parametrize("activation", ["gelu", "relu2", "swiglu"])
@pytest.mark.parametrize("n_shared", [0, 2])
def test_expert_parameter_counts_equal_the_tensors_the_block_holds(activation, n_shared):
    for shape in (COARSE, FINE):
        cfg = block_config(shape, activation, n_shared)
        p = block_weights(cfg)
        routed = sum(p[n].numel() for n in ("w1", "b1", "w2", "b2"))
        shared = sum(p[n].numel() for n in ("sw1", "sb1", "sw2", "sb2") if n in p)
        assert expert_parameter_count(cfg) == cfg.n_layer * routed
        assert shared_expert_parameter_count(cfg) == cfg.n_layer * shared


def test_fine_grained_experts_keep_the_active_parameters_and_the_plan_is_exact_for_the_model():
    """32 experts of d_ff / 4, top-8: the same active expert parameters per token as 8 of d_ff, top-2
    (up to biases), and the whole model (GELU, ReLU^2 and SwiGLU experts, with and without shared
    experts) is planned to the byte."""
    coarse, fine = block_config(COARSE, "swiglu", 0), block_config(FINE, "swiglu", 0)
    active = [expert_parameter_count(c) // c.n_expert * c.top_k for c in (coarse, fine)]
    matrices = [c.top_k * 3 * c.d_model * c.d_ff for c in (coarse, fine)]
    assert matrices[0] == matrices[1] and abs(active[0] - active[1]) < 0.05 * active[0]
    for activation, n_shared in (("gelu", 0), ("relu2", 0), ("swiglu", 0), ("gelu", 1), ("swiglu", 2)):
        config = preset_config("tiny", vocab_size=256, n_layer=2, d_model=32, n_head=2,
                                        block_size=32, n_expert=32, top_k=8, d_ff=16, dropout=0.0,
                                        expert_activation=activation, n_shared_expert=n_shared,
                                        pos="learned", qk_norm=False)  # fmt: skip
        torch.manual_seed(0)
        model = SparseMoETransformer(config).train()
        x = torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
        for precision in ("fp32", "bf16"):
            measured = measure_saved_bytes(
                model, x[:, :-1].contiguous(), x[:, 1:].contiguous(), DTYPES[precision]
            )
            n_params = sum(q.numel() for q in model.parameters())
            plan = plan_memory(config, 2, 32, n_params=n_params, precision=precision, on_gpu=False)
            assert plan.saved_for_backward == measured.total, (activation, n_shared, precision)
            assert expert_parameter_count(config) == sum(
                q.numel()
                for layer in model.layers
                for n, q in layer.named_parameters()
                if n.startswith(("moe.w", "moe.b"))
            )
            assert shared_expert_parameter_count(config) == sum(
                q.numel() for layer in model.layers for n, q in layer.named_parameters() if ".shared." in n
            )


def test_unknown_expert_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="expert_activation"):
        plan_memory(block_config(COARSE, "swish", 0), 2, 8, n_params=10)
    with pytest.raises(ValueError, match="n_shared_expert"):
        plan_memory(block_config(COARSE, "gelu", -1), 2, 8, n_params=10)
