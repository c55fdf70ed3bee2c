"""The exercises: which reference functions and methods each one replaces, and which tests check it.

A target is `module:qualname` in the course (`phase2_architecture.src.norms:LayerNorm.forward`). Your
version lives in the phase's `exercises` package at the mirrored place:
`phase2_architecture/exercises/norms.py`, a function of the same name, or for a method a function of
that name in the class `LayerNormMethods` (where `self` is the course's LayerNorm). A test id is a
pytest node id; one ending in `*` selects every parametrization whose id starts with what comes before
it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Exercise:
    name: str
    what: str
    targets: tuple[str, ...]
    tests: tuple[str, ...]


def _tests(path: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{path}::{name}" for name in names)


P1 = "phase1_foundation/tests/"
P2 = "phase2_architecture/tests/"
P3 = "phase3_components/tests/"
P4 = "phase4_training/tests/"
P5 = "phase5_production/tests/"

EXERCISES = (
    # ---------------------------------------------------------------- Phase 1
    Exercise(
        "tanh_backward",
        "the backward pass of the NumPy network: tanh hidden layers, linear output, MSE",
        ("phase1_foundation.src.backprop_from_scratch:TinyNN.backward",),
        _tests(
            P1 + "test_gradient_check.py",
            "test_analytic_gradients_match_central_differences",
            "test_backward_equals_torch_autograd",
        ),
    ),
    Exercise(
        "gradient_check",
        "central-difference gradients of any loss, the yardstick for every backward pass",
        ("phase1_foundation.src.backprop_from_scratch:numerical_gradients",),
        _tests(P1 + "test_gradient_check.py", "test_numerical_gradients_on_a_known_function"),
    ),
    Exercise(
        "value_ops",
        "the autograd Value's operations, each with its local derivative (+, *, **, tanh, exp, log, relu)",
        tuple(
            f"phase1_foundation.src.autograd_engine:Value.{op}"
            for op in ("__add__", "__mul__", "__pow__", "tanh", "exp", "log", "relu")
        ),
        _tests(
            P1 + "test_autograd_engine.py",
            "test_every_operation_matches_torch_individually",
            "test_relu_gradient_is_zero_for_negative_inputs",
        ),
    ),
    Exercise(
        "value_backward",
        "reverse-mode autodiff: topological order, then each node's _backward from the output down",
        (
            "phase1_foundation.src.autograd_engine:Value.topological_order",
            "phase1_foundation.src.autograd_engine:Value.backward",
        ),
        _tests(
            P1 + "test_autograd_engine.py",
            "test_gradients_accumulate_over_repeated_use",
            "test_long_chain_does_not_hit_recursion_limit",
        ),
    ),
    Exercise(
        "softmax",
        "a softmax, log-sum-exp and log-softmax that never overflow",
        (
            "phase1_foundation.src.primitives:softmax",
            "phase1_foundation.src.primitives:logsumexp",
            "phase1_foundation.src.primitives:log_softmax",
        ),
        _tests(
            P1 + "test_primitives.py", "test_softmax_log_softmax_logsumexp_equal_torch_even_for_huge_logits"
        ),
    ),
    Exercise(
        "cross_entropy",
        "cross-entropy through log-sum-exp, with ignored (padding) targets",
        ("phase1_foundation.src.primitives:cross_entropy",),
        _tests(
            P1 + "test_primitives.py", "test_cross_entropy_equals_torch_with_ignore_index_and_large_logits"
        ),
    ),
    Exercise(
        "causal_mask",
        "the causal mask: query i may attend key j only when j <= i",
        ("phase1_foundation.src.attention_mechanism:causal_mask",),
        _tests(
            P1 + "test_attention_mechanism.py",
            "test_causal_mask_is_lower_triangular",
            "test_causal_mha_later_token_changes_no_earlier_output",
        ),
    ),
    Exercise(
        "attention",
        "scaled dot-product attention with an optional boolean mask",
        ("phase1_foundation.src.attention_mechanism:scaled_dot_product_attention",),
        _tests(
            P1 + "test_attention_mechanism.py",
            "test_scaled_dot_product_attention_matches_torch",
            "test_scaling_by_sqrt_d_is_used",
        ),
    ),
    # ---------------------------------------------------------------- Phase 2
    Exercise(
        "layernorm",
        "LayerNorm's forward: normalise over the channels, then scale and shift",
        ("phase2_architecture.src.norms:LayerNorm.forward",),
        _tests(
            P2 + "test_norms.py",
            "test_layernorm_matches_torch_forward_and_backward",
            "test_layernorm_gradcheck",
        ),
    ),
    Exercise(
        "rmsnorm",
        "RMSNorm's forward: divide by the root mean square, then scale",
        ("phase2_architecture.src.norms:RMSNorm.forward",),
        _tests(P2 + "test_norms.py", "test_rmsnorm_matches_torch_forward_and_backward"),
    ),
    Exercise(
        "swiglu",
        "the SwiGLU feed-forward: down(silu(gate(x)) * up(x))",
        ("phase2_architecture.src.feed_forward:SwiGLUFeedForward.forward",),
        _tests(P2 + "test_feed_forward.py", "test_swiglu_matches_reference_formula_and_grads"),
    ),
    Exercise(
        "rope",
        "rotary position embedding: rotate each pair of channels by a position-dependent angle",
        ("phase2_architecture.src.positional_encoding:apply_rope",),
        _tests(
            P2 + "test_positional_encoding.py",
            "test_apply_rope_equals_complex_multiplication",
            "test_rope_preserves_norms_and_position_zero_is_identity",
            "test_rope_score_depends_only_on_relative_position",
        ),
    ),
    Exercise(
        "online_softmax",
        "log-sum-exp in one pass over blocks, with a running maximum (FlashAttention's softmax)",
        ("phase2_architecture.src.tiled_attention:online_logsumexp",),
        _tests(P2 + "test_tiled_attention.py", "test_online_logsumexp_equals_torch_even_for_huge_values"),
    ),
    Exercise(
        "moe_router",
        "the MoE router: top-k experts per token, softmax over the chosen logits",
        ("phase2_architecture.src.mixture_of_experts:route_top_k",),
        _tests(
            P2 + "test_mixture_of_experts.py",
            "test_route_top_k_picks_the_largest_logits_and_softmaxes_only_them",
        ),
    ),
    Exercise(
        "moe_dispatch",
        "the MoE dispatch: sort (token, slot) pairs by expert, run each expert on its rows, scatter back",
        (
            "phase2_architecture.src.mixture_of_experts:sort_pairs_by_expert",
            "phase2_architecture.src.mixture_of_experts:moe_ffn_sorted",
        ),
        _tests(
            P2 + "test_mixture_of_experts.py",
            "test_loop_and_sorted_dispatch_equal_the_per_token_formula_forward_and_gradients",
        ),
    ),
    Exercise(
        "load_balancing",
        "the Switch Transformer load-balancing loss: E * sum_e f_e * P_e",
        ("phase2_architecture.src.mixture_of_experts:load_balancing_loss",),
        _tests(
            P2 + "test_mixture_of_experts.py",
            "test_load_balancing_loss_is_one_when_balanced_and_E_when_collapsed",
        ),
    ),
    # ---------------------------------------------------------------- Phase 3
    Exercise(
        "bpe_merges",
        "BPE's two steps: count adjacent pairs, merge the most frequent one into a new id",
        ("phase3_components.src.bpe_tokenizer:count_pairs", "phase3_components.src.bpe_tokenizer:merge_pair"),
        _tests(
            P3 + "test_bpe_tokenizer.py",
            "test_merge_pair_and_count_pairs",
            "test_merges_follow_frequency_on_hand_made_corpus",
        ),
    ),
    Exercise(
        "adamw",
        "Adam's step (moments, bias correction) and AdamW's decoupled weight decay",
        (
            "phase3_components.src.optimizers:Adam.step",
            "phase3_components.src.optimizers:AdamW._decoupled_decay",
        ),
        (
            P3 + "test_optimizers.py::test_step_for_step_equal_to_torch[Adam*",
            P3 + "test_optimizers.py::test_equal_to_torch_with_a_changing_learning_rate[adamw]",
            P3 + "test_optimizers.py::test_adamw_decay_is_decoupled_from_the_gradient_scale",
        ),
    ),
    Exercise(
        "newton_schulz",
        "Muon's Newton-Schulz iteration: orthogonalise a matrix with five quintic steps",
        ("phase3_components.src.muon:newton_schulz",),
        _tests(
            P3 + "test_muon.py",
            "test_newton_schulz_keeps_singular_vectors_and_pushes_singular_values_towards_one",
            "test_one_step_applies_the_quintic_to_each_singular_value",
        ),
    ),
    Exercise(
        "warmup_cosine",
        "the warmup + cosine learning-rate schedule",
        ("phase3_components.src.lr_schedules:warmup_cosine_lr",),
        _tests(
            P3 + "test_lr_schedules.py",
            "test_warmup_cosine_equals_torch_sequential_schedule",
            "test_warmup_cosine_boundary_values_by_hand",
        ),
    ),
    Exercise(
        "clip_grad_norm",
        "gradient clipping by the global norm of all gradients",
        (
            "phase3_components.src.gradient_clipping:global_grad_norm",
            "phase3_components.src.gradient_clipping:clip_grad_norm",
        ),
        _tests(
            P3 + "test_gradient_clipping.py",
            "test_equal_to_torch",
            "test_global_norm_is_norm_of_the_concatenation",
        ),
    ),
    # ---------------------------------------------------------------- Phase 4
    Exercise(
        "lora",
        "LoRA: the low-rank update B A * alpha / r, its forward, and merging it into the weight and back",
        tuple(
            f"phase4_training.src.lora:LoRALinear.{m}"
            for m in ("delta_weight", "forward", "merge", "unmerge")
        ),
        _tests(
            P4 + "test_lora.py",
            "test_lora_linear_matches_explicit_formula",
            "test_merge_equals_unmerged_and_unmerge_restores_base_weights",
        ),
    ),
    Exercise(
        "bradley_terry",
        "the reward model's Bradley-Terry loss: -log sigmoid(r_chosen - r_rejected)",
        ("phase4_training.src.reward_model:bradley_terry_loss",),
        _tests(P4 + "test_reward_model.py", "test_bradley_terry_loss_on_hand_made_numbers"),
    ),
    Exercise(
        "dpo_loss",
        "the DPO loss from policy and reference log-probabilities (derived in the Phase 4 README)",
        ("phase4_training.src.dpo:dpo_loss",),
        _tests(
            P4 + "test_dpo.py",
            "test_dpo_loss_on_hand_made_numbers",
            "test_dpo_loss_against_an_independent_computation",
        ),
    ),
    Exercise(
        "gae",
        "generalised advantage estimation, computed backwards through the sequence",
        ("phase4_training.src.ppo_rlhf:gae_advantages",),
        _tests(P4 + "test_ppo_rlhf.py", "test_gae_against_the_direct_sum"),
    ),
    Exercise(
        "ppo_clip",
        "PPO's clipped surrogate objective",
        ("phase4_training.src.ppo_rlhf:ppo_clipped_objective",),
        _tests(P4 + "test_ppo_rlhf.py", "test_clipped_objective_on_hand_made_numbers"),
    ),
    # ---------------------------------------------------------------- Phase 5
    Exercise(
        "top_k",
        "top-k filtering: every logit outside the k largest becomes -inf",
        ("phase5_production.src.sampling:top_k_filter",),
        _tests(P5 + "test_sampling.py", "test_top_k_keeps_exactly_the_k_largest"),
    ),
    Exercise(
        "top_p",
        "nucleus (top-p) filtering: keep the smallest set of tokens whose probability reaches p",
        ("phase5_production.src.sampling:top_p_filter",),
        _tests(
            P5 + "test_sampling.py",
            "test_top_p_keeps_the_smallest_set_reaching_p",
            "test_top_p_is_per_row_and_matches_a_python_reference",
            "test_top_p_one_keeps_everything",
        ),
    ),
    Exercise(
        "kv_cache",
        "the KV-cache update: append a layer's new keys and values to what it holds",
        ("phase5_production.src.kv_cache:KVCache.append",),
        _tests(
            P5 + "test_kv_cache.py",
            "test_prefill_logits_equal_full_forward",
            "test_incremental_steps_equal_full_forward",
        ),
    ),
    Exercise(
        "int8_quantization",
        "per-channel symmetric int8 quantization of a weight matrix",
        ("phase5_production.src.quantization:quantize_per_channel_int8",),
        _tests(
            P5 + "test_quantization.py",
            "test_round_trip_error_is_at_most_half_a_step_per_element",
            "test_zero_row_is_reproduced_exactly",
        ),
    ),
)

BY_NAME = {exercise.name: exercise for exercise in EXERCISES}


def split_target(target: str) -> tuple[str, str]:
    """'phase2_architecture.src.norms:LayerNorm.forward' -> (module, qualname)."""
    module, _, qualname = target.partition(":")
    return module, qualname


def learner_location(target: str, package: str = "") -> tuple[str, str]:
    """Where your version of `target` lives: (module, attribute path) in the phase's `exercises` package,
    or under `package` when one is named (`package/phase2_architecture/exercises/norms.py`).

    A function keeps its name; a method `C.m` is the function `m` of the class `CMethods`.
    """
    module, qualname = split_target(target)
    phase, _, name = module.split(".")
    learner_module = f"{package + '.' if package else ''}{phase}.exercises.{name}"
    if "." in qualname:
        cls, method = qualname.split(".")
        return learner_module, f"{cls}Methods.{method}"
    return learner_module, qualname


def matches_test_id(pattern: str, nodeid: str) -> bool:
    """Whether the pytest node `nodeid` is selected by `pattern` (see the module docstring)."""
    if pattern.endswith("*"):
        return nodeid.startswith(pattern[:-1])
    return nodeid == pattern or (nodeid.startswith(pattern + "[") and "[" not in pattern)


def selected(spec: str) -> list[Exercise]:
    """The exercises named by `spec`: 'all' or a comma-separated list of names."""
    if spec.strip() == "all":
        return list(EXERCISES)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(
            f"unknown exercise(s) {unknown}: `python -m phase1_foundation.exercise_runner list` shows "
            f"the names (or use LLM_EXERCISES=all)"
        )
    return [BY_NAME[n] for n in names]
