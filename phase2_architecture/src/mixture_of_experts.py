"""A sparse mixture of experts (MoE), from a dense feed-forward network to the production dispatch.

A dense transformer block runs ONE feed-forward network (FFN) on every token. A mixture of experts
holds E FFNs ("experts") and a router that sends each token to only k of them (top-k), so the
model has E times the FFN parameters but each token pays for k FFNs (Shazeer et al. 2017; Switch
Transformer, Fedus et al. 2021; Mixtral). For N tokens x [N, C]:

    gate logits   z = x W_g^T + b_g                                  [N, E]
    top-k         the k largest logits of each row, their experts   [N, k]
    weights       g = softmax over those k logits only               [N, k], rows sum to 1
    output        y_n = sum_j g_nj * FFN_{e_nj}(x_n),   FFN_e(x) = GELU(x W1_e + b1_e) W2_e + b2_e

Three ways to compute the same y, all plain autograd:

    moe_ffn_per_token        the formula read literally: token by token, slot by slot (slowest;
                             the reference every other version is tested against).
    moe_ffn_loop_reference   for each expert: a boolean mask of its tokens, run the FFN on them,
                             add the weighted result back. Readable, but every expert scans all N
                             tokens (E passes over the batch) and indexes with masks.
    moe_ffn_sorted           sort the N*k (token, slot) pairs by expert once; each expert's pairs
                             are then one contiguous slice: gather the rows once, one matmul pair
                             per expert on its slice, one scatter-add back. This is the algorithm
                             of the production model (sparse_moe_transformer/src/moe_dispatch.py,
                             which adds a hand-written backward on top).

The router needs help to use its experts evenly; two auxiliary losses:

    load_balancing_loss   Switch: E * sum_i f_i * P_i, f_i = fraction of assignments to expert i,
                          P_i = mean router probability of i. Equals 1 at perfect balance, E when
                          one expert takes everything. Without it the router collapses onto a few
                          experts (see the notebook).
    router_z_loss         ST-MoE: mean of logsumexp(z)^2; keeps the gate logits small, so the
                          softmax does not saturate and stays numerically safe in low precision.

or no loss at all (DeepSeek-V3's auxiliary-loss-free balancing):

    route_with_bias       a per-expert bias b is added to the gate logits ONLY to choose the top-k
                          experts; the chosen experts' weights come from the unbiased logits.
    update_balance_bias   after each optimizer step, b_e += u * sign(mean load - load_e): a fixed
                          step towards equal load, no gradient, nothing added to the LM loss.

Capacity: with `capacity` set, each expert takes at most that many (token, slot) pairs; the rest are
dropped (they add nothing; the residual connection carries the token on). Priority is slot-major:
every token's first choice before any second choice, earlier tokens first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from phase1_foundation.src.attention_mechanism import MultiHeadAttention
from phase2_architecture.src.norms import LayerNorm
from phase2_architecture.src.positional_encoding import LearnedPositionalEmbedding

# ---------------------------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------------------------


def route_top_k(gate_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_logits [N, E] -> (weights [N, k], indices [N, k]): top-k experts, softmax among their logits.

    Softmaxing only the selected logits makes each token's weights sum to 1 whatever k is (Mixtral);
    the router still learns through the relative size of the k chosen logits.
    """
    if gate_logits.dim() != 2:
        raise ValueError(f"gate_logits must be [N, E], got shape {tuple(gate_logits.shape)}.")
    n_expert = gate_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_expert:
        raise ValueError(f"top_k must be an int in [1, n_expert={n_expert}], got {top_k!r}.")
    top_logits, indices = torch.topk(gate_logits, top_k, dim=-1)  # [N, k], [N, k]
    weights = torch.softmax(top_logits, dim=-1)  # [N, k]
    return weights, indices


def route_with_bias(
    gate_logits: torch.Tensor, balance_bias: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_logits [N, E], balance_bias [E] -> (weights [N, k], indices [N, k]), as `route_top_k`.

    The bias only decides WHICH experts a token goes to: indices = top-k of (z + b). The weights are
    a softmax over the chosen experts' UNBIASED logits z, so the bias never scales an expert's
    output and the language-model gradient never sees it (DeepSeek-V3, Wang et al. 2024). With
    b = 0 this is `route_top_k`.
    """
    if gate_logits.dim() != 2:
        raise ValueError(f"gate_logits must be [N, E], got shape {tuple(gate_logits.shape)}.")
    n_expert = gate_logits.shape[1]
    if balance_bias.shape != (n_expert,):
        raise ValueError(
            f"balance_bias must be [E] = [{n_expert}] (one per expert), got {tuple(balance_bias.shape)}."
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_expert:
        raise ValueError(f"top_k must be an int in [1, n_expert={n_expert}], got {top_k!r}.")
    indices = torch.topk(gate_logits.detach() + balance_bias, top_k, dim=-1).indices  # [N, k] biased choice
    weights = torch.softmax(gate_logits.gather(1, indices), dim=-1)  # [N, k] from the unbiased logits
    return weights, indices


@torch.no_grad()
def update_balance_bias(
    balance_bias: torch.Tensor, expert_load: torch.Tensor, step_size: float
) -> torch.Tensor:
    """The new bias [E]: b_e + step_size * sign(mean(load) - load_e), for expert_load [E] of one step.

    Under-loaded experts (load below the mean) gain step_size, over-loaded ones lose it, exactly
    balanced ones keep their bias. Only the sign of the imbalance counts, so `expert_load` may be
    counts or fractions, and the step is the same however skewed the router is (DeepSeek-V3's
    update rate gamma). Data-parallel: all-reduce the counts first and every rank gets the same bias.
    """
    if expert_load.shape != balance_bias.shape or balance_bias.dim() != 1:
        raise ValueError(
            f"balance_bias and expert_load must both be [E], got {tuple(balance_bias.shape)} "
            f"and {tuple(expert_load.shape)}."
        )
    if isinstance(step_size, bool) or not isinstance(step_size, int | float) or not step_size > 0:
        raise ValueError(f"step_size must be a number > 0 (e.g. 1e-3), got {step_size!r}.")
    load = expert_load.to(balance_bias.dtype)  # [E] counts arrive as integers
    return balance_bias + step_size * torch.sign(load.mean() - load)  # [E]


def expert_capacity(n_tokens: int, top_k: int, n_expert: int, capacity_factor: float | None) -> int | None:
    """Pairs one expert may take: ceil(capacity_factor * N * k / E). None (no factor) means no limit.

    With perfect balance every expert gets N * k / E pairs; a factor of 1.25 leaves 25% headroom.
    """
    if capacity_factor is None:
        return None
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}.")
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_expert))


def capacity_keep_mask(indices: torch.Tensor, n_expert: int, capacity: int | None) -> torch.Tensor:
    """indices [N, k] -> keep [N, k] bool: False for the pairs beyond their expert's capacity.

    Pairs queue slot-major (all first choices in token order, then all second choices, ...). A pair
    is kept when fewer than `capacity` earlier pairs in the queue chose the same expert.
    """
    if capacity is None:
        return torch.ones_like(indices, dtype=torch.bool)
    queue = indices.t().reshape(-1)  # [k*N] slot-major
    one_hot = F.one_hot(queue, n_expert)  # [k*N, E]
    place_in_line = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # [k*N] 0 for an expert's first pair
    keep = place_in_line < capacity  # [k*N]
    return keep.reshape(indices.shape[1], indices.shape[0]).t()  # [N, k]


def expert_forward(x: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """One expert's FFN on its rows: GELU(x W1 + b1) W2 + b2, x [m, C] -> [m, C] (exact, erf GELU)."""
    return F.gelu(x @ w1 + b1) @ w2 + b2  # [m, F] -> [m, C]


def _check_shapes(x, gate_weight, gate_bias, w1, b1, w2, b2) -> None:
    N, C = x.shape
    E, _, Fh = w1.shape
    expected = {
        "gate_weight": (gate_weight, (E, C)),
        "gate_bias": (gate_bias, (E,)),
        "w1": (w1, (E, C, Fh)),
        "b1": (b1, (E, Fh)),
        "w2": (w2, (E, Fh, C)),
        "b2": (b2, (E, C)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} for x [N, {C}] and {E} experts, got {tuple(tensor.shape)}."
            )


# ---------------------------------------------------------------------------------------------
# Dispatch 0: the formula, token by token
# ---------------------------------------------------------------------------------------------


def moe_ffn_per_token(x, gate_weight, gate_bias, w1, b1, w2, b2, top_k, capacity=None):
    """y_n = sum_j g_nj * FFN_{e_nj}(x_n), one token and one slot at a time (capacity: Python counters)."""
    _check_shapes(x, gate_weight, gate_bias, w1, b1, w2, b2)
    N, n_expert = x.shape[0], w1.shape[0]
    weights, indices = route_top_k(x @ gate_weight.t() + gate_bias, top_k)  # [N, k], [N, k]
    kept = [[True] * top_k for _ in range(N)]
    if capacity is not None:  # walk the queue: all first choices in token order, then second choices
        used = [0] * n_expert
        for j in range(top_k):
            for n in range(N):
                e = int(indices[n, j])
                kept[n][j] = used[e] < capacity
                used[e] += kept[n][j]
    rows = []
    for n in range(N):
        y_n = torch.zeros_like(x[n])  # [C]
        for j in range(top_k):
            if kept[n][j]:
                e = int(indices[n, j])
                y_n = y_n + weights[n, j] * expert_forward(x[n], w1[e], b1[e], w2[e], b2[e])
        rows.append(y_n)
    return torch.stack(rows)  # [N, C]


# ---------------------------------------------------------------------------------------------
# Dispatch 1: the loop over experts with boolean masks (the readable reference)
# ---------------------------------------------------------------------------------------------


def moe_ffn_loop_reference(x, gate_weight, gate_bias, w1, b1, w2, b2, top_k, capacity=None):
    """y [N, C] = sum over each token's top-k experts of weight * FFN_e(x); one masked pass per expert.

    x [N, C]; gate_weight [E, C], gate_bias [E]; w1 [E, C, F], b1 [E, F], w2 [E, F, C], b2 [E, C].
    """
    _check_shapes(x, gate_weight, gate_bias, w1, b1, w2, b2)
    n_expert = w1.shape[0]
    gate_logits = x @ gate_weight.t() + gate_bias  # [N, E]
    weights, indices = route_top_k(gate_logits, top_k)  # [N, k], [N, k]
    chosen = capacity_keep_mask(indices, n_expert, capacity)  # [N, k] pairs that are not dropped
    out = torch.zeros_like(x)  # [N, C]
    for e in range(n_expert):
        mask = (indices == e) & chosen  # [N, k] slots of this expert
        rows = mask.any(dim=-1)  # [N] tokens that picked e (a token picks an expert at most once)
        if not rows.any():
            continue
        y = expert_forward(x[rows], w1[e], b1[e], w2[e], b2[e])  # [m, C]
        weight = (weights * mask).sum(dim=-1)[rows]  # [m] the token's weight for expert e
        out = out.index_put((rows,), y * weight[:, None], accumulate=True)  # out[rows] += ...
    return out


# ---------------------------------------------------------------------------------------------
# Dispatch 2: sort the (token, slot) pairs by expert, contiguous slices, one scatter back
# ---------------------------------------------------------------------------------------------


def sort_pairs_by_expert(indices: torch.Tensor, keep: torch.Tensor, n_expert: int):
    """indices, keep [N, k] -> (order [M], token_of_pair [M], counts [E]) for the M kept pairs.

    Pair p = slot * N + token (slot-major). One stable argsort groups the pairs by expert, so
    expert e's pairs are the contiguous slice counts[:e].sum() : counts[:e+1].sum().
    """
    N = indices.shape[0]
    flat_expert = indices.t().reshape(-1)  # [k*N]
    kept = keep.t().reshape(-1).nonzero().squeeze(-1)  # [M] kept pair ids, in queue order
    order = kept[torch.argsort(flat_expert[kept], stable=True)]  # [M] kept pairs grouped by expert
    token_of_pair = order % N  # [M]
    counts = torch.bincount(flat_expert[order], minlength=n_expert)  # [E]
    return order, token_of_pair, counts


def moe_ffn_sorted(x, gate_weight, gate_bias, w1, b1, w2, b2, top_k, capacity=None):
    """The same y as `moe_ffn_loop_reference`: one sort, per-expert matmuls on slices, one scatter-add."""
    _check_shapes(x, gate_weight, gate_bias, w1, b1, w2, b2)
    gate_logits = x @ gate_weight.t() + gate_bias  # [N, E]
    weights, indices = route_top_k(gate_logits, top_k)  # [N, k], [N, k]
    return moe_ffn_sorted_from_routing(x, weights, indices, w1, b1, w2, b2, capacity)


def moe_ffn_sorted_from_routing(x, weights, indices, w1, b1, w2, b2, capacity=None):
    """The sorted dispatch for a routing already made: x [N, C], weights and indices [N, k] -> y [N, C].

    The router is then free to choose differently (a balancing bias, `route_with_bias`).
    """
    n_expert = w1.shape[0]
    keep = capacity_keep_mask(indices, n_expert, capacity)  # [N, k]
    order, token_of_pair, counts = sort_pairs_by_expert(indices, keep, n_expert)  # [M], [M], [E]

    xs = x[token_of_pair]  # [M, C] one gather: the token rows in expert order
    pair_weight = weights.t().reshape(-1)[order]  # [M] routing weight of each sorted pair
    ys = []
    start = 0
    for e, count in enumerate(counts.tolist()):  # one small host sync for the slice bounds
        if count:
            ys.append(expert_forward(xs[start : start + count], w1[e], b1[e], w2[e], b2[e]))  # [m_e, C]
        start += count
    y = torch.cat(ys) if ys else xs.new_zeros(0, x.shape[1])  # [M, C]
    out = torch.zeros_like(x)  # [N, C]
    return out.index_add(0, token_of_pair, y * pair_weight[:, None])  # one scatter-add back to tokens


# ---------------------------------------------------------------------------------------------
# Auxiliary losses
# ---------------------------------------------------------------------------------------------


def load_balancing_loss(router_probs: torch.Tensor, expert_counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's balancing loss  E * sum_i f_i * P_i  (Fedus et al. 2021, eq. 4).

    router_probs [N, E]: softmax of the gate logits over ALL experts (differentiable).
    expert_counts [E]: (token, slot) pairs routed to each expert (a count: no gradient).
    f_i = counts_i / sum(counts), the fraction of the assignments expert i got; P_i = mean_n probs[n, i].
    The gradient flows through P only: it lowers the probability of the experts that are over-used.
    Both f and P sum to 1, so the loss is 1 when both are uniform and E when one expert gets all.
    Taking counts (not indices) makes the data-parallel version the same function: sum the
    counts over the ranks (all_reduce) first.
    """
    if router_probs.dim() != 2 or expert_counts.shape != router_probs.shape[1:]:
        raise ValueError(
            f"router_probs must be [N, E] and expert_counts [E], got {tuple(router_probs.shape)} "
            f"and {tuple(expert_counts.shape)}."
        )
    n_expert = router_probs.shape[1]
    f = expert_counts.to(router_probs.dtype) / expert_counts.sum()  # [E]
    P = router_probs.mean(dim=0)  # [E]
    return n_expert * torch.sum(f * P)


def router_z_loss(gate_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022): mean over tokens of logsumexp(z)^2.

    logsumexp(z) is about the largest logit; squaring it penalises large logits, which would make
    the router softmax saturate (vanishing router gradients) and overflow in bfloat16.
    """
    return torch.logsumexp(gate_logits, dim=-1).square().mean()


# ---------------------------------------------------------------------------------------------
# An MoE feed-forward layer and a small MoE language model (for the notebook's experiment)
# ---------------------------------------------------------------------------------------------


class MoEFeedForward(nn.Module):
    """E expert FFNs and a router; forward(x [..., C]) -> (y [..., C], gate_logits [N, E]).

    The gate logits are returned, not stored, so the caller computes the auxiliary losses (as
    Mixtral's `router_logits`). Parameters have the production model's layout. The buffer
    `balance_bias` [E] shifts only the choice of experts (`route_with_bias`); it stays 0 unless the
    training loop updates it (`update_balance_bias`), and is saved in the state_dict.
    """

    def __init__(self, d_model: int, d_ff: int, n_expert: int, top_k: int, capacity_factor=None):
        super().__init__()
        if not 1 <= top_k <= n_expert:
            raise ValueError(f"top_k must be in [1, n_expert={n_expert}], got {top_k}.")
        self.n_expert, self.top_k, self.capacity_factor = n_expert, top_k, capacity_factor
        self.gate = nn.Linear(d_model, n_expert)
        self.w1 = nn.Parameter(torch.randn(n_expert, d_model, d_ff) * 0.02)  # [E, C, F]
        self.b1 = nn.Parameter(torch.zeros(n_expert, d_ff))  # [E, F]
        self.w2 = nn.Parameter(torch.randn(n_expert, d_ff, d_model) * 0.02)  # [E, F, C]
        self.b2 = nn.Parameter(torch.zeros(n_expert, d_model))  # [E, C]
        self.register_buffer("balance_bias", torch.zeros(n_expert))  # [E] no gradient

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, x.shape[-1])  # [N, C]
        capacity = expert_capacity(flat.shape[0], self.top_k, self.n_expert, self.capacity_factor)
        gate_logits = self.gate(flat)  # [N, E]
        weights, indices = route_with_bias(gate_logits, self.balance_bias, self.top_k)  # [N, k], [N, k]
        y = moe_ffn_sorted_from_routing(flat, weights, indices, self.w1, self.b1, self.w2, self.b2, capacity)
        return y.reshape(x.shape), gate_logits


@dataclass
class MoEConfig:
    """A GPT whose FFNs are mixtures of experts (names as in Phase 2's GPTConfig)."""

    vocab_size: int
    block_size: int
    n_layer: int = 1
    n_head: int = 4
    d_model: int = 64
    n_expert: int = 8
    top_k: int = 2
    d_ff: int = 128
    capacity_factor: float | None = None


class MoEBlock(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + moe(ln2(x)); also returns the gate logits."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.ln1 = LayerNorm(config.d_model)
        self.attn = MultiHeadAttention(config.d_model, config.n_head)
        self.ln2 = LayerNorm(config.d_model)
        self.moe = MoEFeedForward(
            config.d_model, config.d_ff, config.n_expert, config.top_k, config.capacity_factor
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln1(x), causal=True)[0]  # [B, T, C]
        y, gate_logits = self.moe(self.ln2(x))
        return x + y, gate_logits


class MoELanguageModel(nn.Module):
    """tok_emb + pos_emb -> MoE blocks -> ln_f -> lm_head; forward -> (logits, loss, gate logits per layer)"""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = LearnedPositionalEmbedding(config.block_size, config.d_model)
        self.blocks = nn.ModuleList(MoEBlock(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.tok_emb(idx) + self.pos_emb.positions(idx.shape[1])  # [B, T, C]
        all_gate_logits = []
        for block in self.blocks:
            x, gate_logits = block(x)
            all_gate_logits.append(gate_logits)  # [B*T, E]
        logits = self.lm_head(self.ln_f(x))  # [B, T, V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss, all_gate_logits


def routing_losses(
    gate_logits: torch.Tensor, top_k: int, balance_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate_logits [N, E] -> (balancing loss, z-loss, expert_counts [E]) for one MoE layer.

    The counts are of the choice the layer made: with its balance_bias [E] when given.
    """
    n_expert = gate_logits.shape[1]
    bias = gate_logits.new_zeros(n_expert) if balance_bias is None else balance_bias
    _, indices = route_with_bias(gate_logits, bias, top_k)  # [N, k]
    counts = torch.bincount(indices.reshape(-1), minlength=n_expert)  # [E]
    probs = torch.softmax(gate_logits, dim=-1)  # [N, E]
    return load_balancing_loss(probs, counts), router_z_loss(gate_logits), counts


def train_moe_language_model(
    config: MoEConfig,
    get_batch,
    *,
    steps: int,
    lr: float = 3e-3,
    aux_coef: float = 0.01,
    z_coef: float = 1e-3,
    bias_step: float = 0.0,
    seed: int = 0,
) -> tuple[MoELanguageModel, list[dict]]:
    """Train with AdamW on lm_loss + aux_coef * balancing + z_coef * z-loss (averaged over layers).

    bias_step > 0 also balances without a loss: after each optimizer step every layer's
    balance_bias moves by bias_step towards equal load (`update_balance_bias`).
    History, one dict per step: {"step", "loss" (LM only), "aux", "z", "load" ([E] fraction of the
    first layer's assignments per expert), "bias" ([E] the first layer's balance_bias after the step)}.
    """
    if bias_step < 0:
        raise ValueError(f"bias_step must be >= 0 (0 turns bias balancing off), got {bias_step}.")
    torch.manual_seed(seed)
    model = MoELanguageModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    history = []
    for step in range(steps):
        x, y = get_batch("train")
        _, lm_loss, all_gate_logits = model(x, y)
        biases = [block.moe.balance_bias for block in model.blocks]
        losses = [routing_losses(z, config.top_k, b) for z, b in zip(all_gate_logits, biases)]
        aux = sum(loss for loss, _, _ in losses) / len(losses)
        z = sum(loss for _, loss, _ in losses) / len(losses)
        loss = lm_loss + aux_coef * aux + z_coef * z
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if bias_step > 0:  # after the step, from this step's load: the bias has no gradient
            for bias, (_, _, layer_counts) in zip(biases, losses):
                bias.copy_(update_balance_bias(bias, layer_counts, bias_step))
        counts = losses[0][2].float()
        history.append(
            {
                "step": step,
                "loss": lm_loss.item(),
                "aux": aux.item(),
                "z": z.item(),
                "load": counts / counts.sum(),
                "bias": biases[0].clone(),
            }
        )
    return model, history


@torch.no_grad()
def tokens_per_expert(model: MoELanguageModel, idx: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """[E, V] how often each token id was sent (as a first choice) to each expert of `layer`."""
    x = model.tok_emb(idx) + model.pos_emb.positions(idx.shape[1])  # [B, T, C]
    for block in model.blocks[:layer]:
        x, _ = block(x)
    block = model.blocks[layer]
    x = x + block.attn(block.ln1(x), causal=True)[0]
    _, gate_logits = block.moe(block.ln2(x))  # [B*T, E]
    first_choice = (gate_logits + block.moe.balance_bias).argmax(dim=-1)  # [B*T] the choice the layer makes
    table = torch.zeros(model.config.n_expert, model.config.vocab_size)
    table.index_put_((first_choice, idx.reshape(-1)), torch.ones(idx.numel()), accumulate=True)
    return table
