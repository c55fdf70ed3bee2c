"""--mode benchmark: parameters, FLOPs per token, training tokens/s with the step's forward / backward /
optimizer split, decode latency with the KV cache, peak memory; with the hardware facts and the dtype
decisions, printed and written to benchmark.json.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from phase3_components.src.hardware import choose_newton_schulz_dtype, hardware_facts
from sparse_moe_transformer.src.moe_optimizer import make_optimizer
from sparse_moe_transformer.src.param_counts import (
    count_active_parameters,
    count_parameters,
    forward_flops_per_token,
)
from sparse_moe_transformer.src.run_config import DEFAULT_PRESET, merge_settings
from sparse_moe_transformer.src.runtime import Runtime, seed_everything, setup_runtime
from sparse_moe_transformer.src.serving import load_trained_model
from sparse_moe_transformer.src.train import (
    SparseMoETransformer,
    preset_config,
    train_step,
)
from sparse_moe_transformer.src.train_settings import TrainSettings


def benchmark_main(args) -> dict:
    """Parameters, FLOPs/token, training tokens/s (and the step's forward / backward / optimizer split),
    generation latency per token (KV cache), peak memory; with the hardware facts and dtype decisions."""
    rt = setup_runtime(args.device, args.precision or "auto", args.ns_dtype or "auto")
    if args.checkpoint:
        model, _, checkpoint = load_trained_model(args.checkpoint, rt.device)
        config, preset = model.config, checkpoint.get("preset", "checkpoint")
        train_args = checkpoint.get("train_args")
    else:
        preset = args.preset or DEFAULT_PRESET
        config = preset_config(preset, **args.overrides)
        seed_everything(args.seed)
        model = SparseMoETransformer(config).to(rt.device)
        train_args = None
    flags = {"batch_size": args.batch_size, "seq_len": args.seq_len, "optimizer": args.optimizer,
             "ns_dtype": args.ns_dtype, "world_size": 1, "grad_accum_steps": 1, "max_steps": 10**9,
             "max_lr": 1e-4, "min_lr": 1e-4, "warmup_steps": 0}  # fmt: skip
    s = merge_settings(preset, train_args, flags, config)
    gen = torch.Generator().manual_seed(args.seed)
    # inference first, so that its peak memory is inference's alone
    decoding = measure_decoding(model, args.max_new_tokens, rt, gen)
    training = measure_training(model, s, args, rt, gen)
    peak_kind = "CUDA max_memory_allocated" if rt.device.type == "cuda" else "process peak RSS"
    result = {
        "preset": preset,
        "hardware": rt.hardware(),
        "optimizer": optimizer_name(s, rt),
        "device": str(rt.device) if rt.device.type == "cpu" else torch.cuda.get_device_name(rt.device),
        "cpu_threads": torch.get_num_threads(),
        "precision": rt.precision,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "total_params": count_parameters(config),
        "active_params_per_token": count_active_parameters(config),
        "forward_flops_per_token": forward_flops_per_token(config, s.seq_len),
        "gflops_per_forward": forward_flops_per_token(config, s.seq_len) * s.seq_len / 1e9,
        **training,
        **decoding,
        "peak_memory_mb": _peak_memory_bytes(rt.device) / 2**20,
        "peak_memory_kind": peak_kind,
        "method": method_text(args, s, decoding, peak_kind),
    }
    print_benchmark(result, preset, rt)
    out = Path(args.bench_json) if args.bench_json else Path(args.out_dir) / "benchmark.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"saved {out}")
    return result


def measure_decoding(model, max_new_tokens: int, rt: Runtime, gen: torch.Generator) -> dict:
    """Greedy generation, batch 1, with the KV cache: the time to the first token and between tokens."""
    config = model.config
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    model.eval()
    prompt_len = min(16, config.block_size // 4)
    new_tokens = min(max_new_tokens, config.block_size - prompt_len)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=gen).to(rt.device)
    stamps = []
    for _ in range(2):  # the first pass warms up; the second is measured
        stamps = [time.perf_counter()]
        for _tok in model.stream_generate(prompt, new_tokens, temperature=0.0):
            _sync(rt.device)
            stamps.append(time.perf_counter())
    gaps = np.diff(stamps)  # gaps[0] = prefill + first token; the rest = one cached decoding step each
    return {
        "prompt_tokens": prompt_len,
        "prefill_and_first_token_ms": 1e3 * float(gaps[0]),
        "decode_ms_per_token_median": 1e3 * float(np.median(gaps[1:])) if len(gaps) > 1 else None,
        "decode_tokens": int(len(gaps) - 1),
        "inference_peak_memory_mb": _peak_memory_bytes(rt.device) / 2**20,
    }


def measure_training(model, s: TrainSettings, args, rt: Runtime, gen: torch.Generator) -> dict:
    """Full optimizer steps (forward, backward, update) on random token ids: the median step and its
    forward / backward / optimizer split."""
    batch, seq, vocab = s.batch_size, s.seq_len, model.config.vocab_size
    model.set_activation_checkpointing(bool(args.activation_checkpointing))
    step_model = torch.compile(model) if args.compile else model
    optimizer = make_optimizer(model, s, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    model.train()
    step_times, stage_times = [], []
    with StageTimer(model, optimizer, rt.device) as stages:
        for i in range(args.bench_warmup + args.bench_steps):
            x = torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(rt.device)
            stages.start()
            train_step(step_model, optimizer, scaler, [(x[:, :-1], x[:, 1:])], s, rt)
            if i >= args.bench_warmup:
                step_times.append(stages.stop())
                stage_times.append(stages.split())
    model.set_activation_checkpointing(False)
    step_s = float(np.median(step_times))
    seen = [t for t in stage_times if t]  # steps whose three stages were all timed
    split = {k: float(np.median([t[k] for t in seen])) for k in seen[0]} if seen else {}
    return {
        "train_batch": [batch, seq],
        "train_step_s": step_s,
        "train_step_split_s": split,
        "train_tokens_per_s": batch * seq / step_s,
    }


def method_text(args, s: TrainSettings, decoding: dict, peak_kind: str) -> str:
    seq = s.seq_len
    return (
        f"latency per generated token: greedy, batch 1, {decoding['prompt_tokens']}-token prompt, "
        f"{decoding['decode_tokens'] + 1} new tokens with the KV cache, median time between streamed tokens "
        f"after a warm-up pass; peak inference memory: {peak_kind} after generation, before any training "
        "(weights, cache, activations); "
        f"GFLOPs per forward: analytic, one sequence of {seq} tokens (2 per multiply-add, attention "
        f"over the full {seq} x {seq} scores); training: median of {args.bench_steps} optimizer steps "
        f"(forward + backward + clip + update) after {args.bench_warmup} warm-up steps, batch "
        f"{s.batch_size} x {seq} random token ids, split at the end of the model's forward and around the "
        f"optimizer's step; peak memory: {peak_kind} of the whole run"
    )


def print_benchmark(result: dict, preset: str, rt: Runtime) -> None:
    batch, seq = result["train_batch"]
    peak_kind, decode = result["peak_memory_kind"], result["decode_ms_per_token_median"]
    rows = [
        ("total parameters", f"{result['total_params'] / 1e6:,.2f} M"),
        ("active parameters / token", f"{result['active_params_per_token'] / 1e6:,.2f} M"),
        ("forward FLOPs / token", f"{result['forward_flops_per_token'] / 1e9:,.4f} GFLOPs"),
        ("GFLOPs / forward", f"{result['gflops_per_forward']:,.2f} (one sequence of {seq} tokens)"),
        ("training tokens / s", f"{result['train_tokens_per_s']:,.0f}  (batch {batch} x {seq})"),
        (
            "training step",
            f"{1e3 * result['train_step_s']:,.1f} ms, median: " + _format_split(result["train_step_split_s"]),
        ),
        ("optimizer", result["optimizer"]),
        ("prefill + first token", f"{result['prefill_and_first_token_ms']:.2f} ms"),
        ("decode latency / token", f"{decode:.2f} ms (KV cache, median)" if decode is not None else "n/a"),
        ("peak inference memory", f"{result['inference_peak_memory_mb']:,.0f} MB ({peak_kind})"),
        ("peak memory (whole run)", f"{result['peak_memory_mb']:,.0f} MB ({peak_kind})"),
        ("device", f"{result['device']}, {result['precision']}, {result['cpu_threads']} CPU threads"),
        ("hardware", hardware_facts(rt.device).summary()),
        ("precision", rt.precision_reason),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"Sparse MoE benchmark: {preset}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"  method: {result['method']}")


class StageTimer:
    """Times each training step and its three stages without touching train_step: the model's forward
    ends at a forward hook, the update is the optimizer's step (wrapped), and the backward is what lies
    between (the MoE losses, backward, unscaling and clipping). Under torch.compile the hook does not
    fire and only whole steps are timed."""

    def __init__(self, model, optimizer, device: torch.device):
        self.model, self.optimizer, self.device, self.marks = model, optimizer, device, {}

    def __enter__(self):
        self.hook = self.model.register_forward_hook(lambda *_: self._mark("forward_end"))
        inner = self.optimizer.step

        def timed_step(*args, **kwargs):
            self._mark("step_start")
            result = inner(*args, **kwargs)
            self._mark("step_end")
            return result

        self.optimizer.step = timed_step
        return self

    def __exit__(self, *exc):
        self.hook.remove()
        del self.optimizer.step  # the class's step again

    def _mark(self, name: str) -> None:
        _sync(self.device)
        self.marks[name] = time.perf_counter()

    def start(self) -> None:
        self.marks = {}
        self._mark("start")

    def stop(self) -> float:
        self._mark("end")
        return self.marks["end"] - self.marks["start"]

    def split(self) -> dict[str, float]:
        """Seconds of forward, backward and optimizer in the last step ({} if a stage was not seen:
        compiled, or an fp16 step the GradScaler skipped)."""
        m = self.marks
        if not {"forward_end", "step_start", "step_end"} <= m.keys():
            return {}
        return {
            "forward": m["forward_end"] - m["start"],
            "backward": m["step_start"] - m["forward_end"],
            "optimizer": m["step_end"] - m["step_start"],
        }


def _format_split(split: dict) -> str:
    if not split:
        return "no split (compiled or skipped steps)"
    return ", ".join(f"{k} {1e3 * v:,.1f} ms" for k, v in split.items())


def optimizer_name(s: TrainSettings, rt: Runtime) -> str:
    if s.optimizer == "muon":
        return f"Muon (Newton-Schulz in {choose_newton_schulz_dtype(s.ns_dtype, rt.device).name}) + AdamW"
    return "AdamW"


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
