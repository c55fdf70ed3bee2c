"""The MoE options of today's sparse models, each off by default: shared experts (DeepSeekMoE), balancing by
a per-expert routing bias (DeepSeek-V3), and a router that computes in fp32 under fp16/bf16 autocast.

- Shared experts: the layer equals the per-token reference plus a dense FFN, outputs and gradients; the
  parameter counts equal the formula.
- Bias balancing: the bias changes which experts are chosen, never the weights the chosen experts get; on a
  skewed router train_step balances the load within a stated number of steps; the bias is saved and
  resumed with the checkpoint.
- fp32 router: under fp16 and bf16 autocast, near-ties choose the experts the fp32 model chooses.
"""

import pytest
import torch
import torch.nn.functional as F

from sparse_moe_transformer.src.checkpointing import LATEST_NAME, read_checkpoint
from sparse_moe_transformer.src.cli import main as cli_main
from sparse_moe_transformer.src.moe_optimizer import make_optimizer
from sparse_moe_transformer.src.param_counts import (
    count_active_parameters,
    count_hidden_matrix_parameters,
    count_parameters,
)
from sparse_moe_transformer.src.runtime import Runtime
from sparse_moe_transformer.src.train import (
    Config,
    SparseMoEFFN,
    SparseMoETransformer,
    preset_config,
    train_step,
)
from sparse_moe_transformer.src.train_settings import TrainSettings

CPU = torch.device("cpu")


def make_moe(seed=0, N=24, dtype=torch.float32, **options):
    torch.manual_seed(seed)
    cfg = Config(vocab_size=11, d_model=12, n_head=1, n_layer=1, n_expert=6, top_k=2, d_ff=20, block_size=8,
                 **options)  # fmt: skip
    moe = SparseMoEFFN(cfg).to(dtype)
    with torch.no_grad():
        for p in (moe.b1, moe.b2, moe.gate.bias):
            p.normal_(std=0.1)
        moe.w1.normal_(std=0.3), moe.w2.normal_(std=0.3)
    return moe, torch.randn(N, 12, dtype=dtype, requires_grad=True)


# ----------------------------------------------------------------------------- shared experts


@pytest.mark.parametrize("activation", ["gelu", "relu2"])
def test_shared_experts_add_a_dense_ffn_to_the_routed_output(activation):
    moe, x = make_moe(n_shared_expert=2, expert_activation=activation, dtype=torch.float64)
    act = F.gelu if activation == "gelu" else (lambda h: F.relu(h).square())
    out, _, _ = moe(x)
    shared = moe.shared
    routed = torch.stack([
        sum(g * (act(x[n] @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e]) for g, e in zip(*_route(moe, x[n])))  # noqa: E501
        for n in range(x.shape[0])
    ])  # fmt: skip
    dense = act(x @ shared.w1.weight.t() + shared.w1.bias) @ shared.w2.weight.t() + shared.w2.bias
    torch.testing.assert_close(out, routed + dense)
    assert shared.w1.weight.shape == (2 * 20, 12)  # two experts of d_ff 20, as one FFN
    params = [x, moe.gate.weight, moe.w1, moe.w2, shared.w1.weight, shared.w2.bias]
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(routed + dense, params, g)):
        torch.testing.assert_close(got, want)


def _route(moe, x_n):
    """One token's (weights, experts): softmax over the top-k gate logits."""
    logits = x_n @ moe.gate.weight.t() + moe.gate.bias
    top = torch.topk(logits, moe.top_k)
    return torch.softmax(top.values, -1), top.indices.tolist()


@pytest.mark.parametrize("shared", [0, 1, 3])
def test_counts_equal_the_modules_with_shared_experts(shared):
    config = preset_config("tiny", n_shared_expert=shared)
    model = SparseMoETransformer(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    assert count_hidden_matrix_parameters(config) == sum(p.numel() for p in model.hidden_matrices())
    one_expert = sum(p[0].numel() for p in (model.layers[0].moe.w1, model.layers[0].moe.b1,
                                            model.layers[0].moe.w2, model.layers[0].moe.b2))  # fmt: skip
    idle = (config.n_expert - config.top_k) * one_expert * config.n_layer
    embeddings_and_head = model.tok_emb.weight.numel() + model.lm_head.weight.numel()
    embeddings_and_head += model.pos_emb.weight.numel() if config.pos == "learned" else 0
    assert count_active_parameters(config) == count_parameters(config) - idle - embeddings_and_head


# ----------------------------------------------------------------------------- bias balancing


def test_the_bias_chooses_the_experts_but_not_their_weights():
    moe, x = make_moe(balance="bias")
    with torch.no_grad():
        moe.balance_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0, 0.0, 0.0]))  # expert 3 always chosen
    out, gate_logits, routing = moe(x)
    assert (routing.topk_index == 3).any(dim=1).all()
    unbiased = torch.softmax(gate_logits.gather(1, routing.topk_index), dim=-1)  # [N, k]
    torch.testing.assert_close(routing.topk_weight, unbiased)
    # a bias leaking into the weights would make expert 3's weight ~1 everywhere
    assert routing.topk_weight[routing.topk_index == 3].max() < 0.99
    # without the bias the choice differs: the bias did change it
    plain = torch.topk(gate_logits, 2, dim=-1).indices
    assert not (plain == 3).any(dim=1).all()


def test_the_bias_is_a_buffer_saved_with_the_model_and_absent_by_default():
    biased = SparseMoETransformer(preset_config("tiny", balance="bias"))
    assert "layers.0.moe.balance_bias" in biased.state_dict()
    assert all(name != "balance_bias" for name, _ in biased.named_parameters())  # no gradient, no optimizer
    plain = SparseMoETransformer(preset_config("tiny"))
    assert not any("balance_bias" in k for k in plain.state_dict())  # old checkpoints load unchanged


BALANCE_STEPS = 150  # a bias moves 0.02 per step; the skew below is 2.0 in logits


def test_train_step_balances_a_skewed_router_within_a_stated_number_of_steps():
    """tiny (4 experts, top-2), every layer's router skewed by +2 towards expert 0 and frozen (lr ~ 0), so
    only the bias can move the load. After BALANCE_STEPS steps every expert's
    share is within 30% of the mean in every layer; before, expert 0 took far more than its share."""
    torch.manual_seed(0)
    config = preset_config("tiny", balance="bias", balance_bias_step=0.02, aux_loss_coef=0.0)
    model = SparseMoETransformer(config)
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.gate.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))
    s = TrainSettings(batch_size=8, grad_accum_steps=1, seq_len=16, max_steps=10**6, max_lr=1e-12,
                      min_lr=0.0, warmup_steps=0, optimizer="adamw", weight_decay=0.0)  # fmt: skip
    optimizer = make_optimizer(model, s, CPU)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(1)

    def step():
        x = torch.randint(0, 97, (8, 17), generator=gen)
        result = train_step(model, optimizer, scaler, [(x[:, :-1], x[:, 1:])], s, Runtime(CPU, None))
        counts = result["expert_counts"]  # [L, E]
        return counts / counts.sum(dim=1, keepdim=True)

    first = step()
    assert (first[:, 0] > 0.4).all()  # skewed: expert 0 in most tokens' top-2 (mean share 0.25)
    for _ in range(BALANCE_STEPS):
        share = step()
    assert ((share - 0.25).abs() < 0.3 * 0.25).all(), share
    for layer in model.layers:  # the favourite's bias went down by about the skew, relative to the others
        bias = layer.moe.balance_bias
        assert bias[0] - bias[1:].mean() < -1.0


def test_the_bias_resumes_exactly_across_processes(tmp_path, cache_dir, argv, losses):
    options = ["--set", "balance=bias", "--set", "balance_bias_step=0.01", "--ns-dtype", "fp32"]
    options += ["--eval-interval", 0, "--save-interval", 0]
    cli_main(argv(tmp_path / "full", cache_dir, *options, steps=8))
    cli_main(argv(tmp_path / "split", cache_dir, *options, "--stop-at-step", 4, steps=8))
    cli_main(argv(tmp_path / "split", cache_dir, *options, "--resume", steps=8))
    full, split = (
        read_checkpoint(tmp_path / "full" / LATEST_NAME),
        read_checkpoint(tmp_path / "split" / LATEST_NAME),
    )
    biases = [k for k in full["model"] if k.endswith("balance_bias")]
    assert biases and all(full["model"][k].abs().sum() > 0 for k in biases)  # the biases moved
    for k in biases:
        torch.testing.assert_close(split["model"][k], full["model"][k], rtol=0, atol=0)
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


# ----------------------------------------------------------------------------- the router in fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_near_ties_choose_the_fp32_experts_under_low_precision_autocast(dtype):
    """Experts 0 and 1 have gate rows 1e-4 apart (a near-tie that bf16/fp16 logits cannot resolve): under
    autocast the router still computes in fp32 and chooses exactly what the fp32 model chooses."""
    moe, x = make_moe(N=256)
    with torch.no_grad():
        moe.gate.weight[1] = moe.gate.weight[0] + 1e-4 * torch.randn(12)
        moe.gate.bias[1] = moe.gate.bias[0]
        moe.gate.weight[2:] *= 0.01  # experts 0 and 1 are everyone's top-2 candidates, in a near-tie order
    x = x.detach()
    _, logits32, routing32 = moe(x)
    with torch.autocast("cpu", dtype=dtype):
        _, logits_low, routing_low = moe(x)
    assert logits_low.dtype == torch.float32
    assert torch.equal(routing_low.topk_index, routing32.topk_index)
    # the same gate in low precision would tie (or flip) many of these tokens
    low = F.linear(x.to(dtype), moe.gate.weight.to(dtype), moe.gate.bias.to(dtype)).float()
    assert not torch.equal(torch.topk(low, 2, dim=-1).indices, routing32.topk_index)
