"""What a training run writes to its folder and prints: the summary files, the header, metrics.jsonl and
the checkpoints.

    start_run_folder   the folder, tokenizer.json, config.json; --overwrite clears the previous run
    print_header       data, tokenizer, model, hardware, device, optimizer, batch and the memory plan
    MetricsLog         metrics.jsonl records: the window's mean losses, throughput and expert load
    save               latest.pt (and best.pt) on rank 0, with every rank's RNG state; never NaN weights
    diverged           the error a diverged run stops with, naming the last good checkpoint
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch
import torch.distributed as torch_dist

from phase3_components.src.hardware import hardware_facts
from phase4_training.src.training_loop import capture_rng_state
from sparse_moe_transformer.src.checkpointing import (
    BEST_NAME,
    LATEST_NAME,
    remove_stale_temp_files,
    save_run_checkpoints,
)
from sparse_moe_transformer.src.expert_parallel import ExpertParallelModel
from sparse_moe_transformer.src.memory_plan import format_memory_plan, plan_memory
from sparse_moe_transformer.src.param_counts import (
    count_hidden_matrix_parameters,
    count_parameters,
    parameter_summary,
)
from sparse_moe_transformer.src.routing_health import CollapseWatch
from sparse_moe_transformer.src.runtime import Runtime, TrainingDiverged

if TYPE_CHECKING:  # annotations only
    from sparse_moe_transformer.src.run_config import Run, TrainState

METRICS_FILE = "metrics.jsonl"


def start_run_folder(run: Run, overwrite: bool) -> None:
    """Create the run folder; --overwrite deletes the previous run's checkpoints and metrics; write
    tokenizer.json and config.json; remove temp files that a killed save left behind."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temp_files(run.out_dir)
    if removed:
        print(f"cleanup   removed {len(removed)} temporary file(s) left by an interrupted save")
    if overwrite:
        old = [run.out_dir / n for n in (LATEST_NAME, BEST_NAME, METRICS_FILE)]
        old = [path for path in old if path.exists()]
        for path in old:
            path.unlink()
        if old:
            print(f"overwrite deleted the previous run's {', '.join(p.name for p in old)}")
    run.tokenizer.save(run.out_dir / "tokenizer.json")
    summary = {"preset": run.preset, "model": asdict(run.config), "training": asdict(run.settings)}
    (run.out_dir / "config.json").write_text(json.dumps(summary, indent=2))


def print_header(run: Run, state: TrainState) -> None:
    c, s, rt, data = run.config, run.settings, run.runtime, run.data
    print(
        f"data      {data.info['source']}: {len(data.train_tokens):,} train / {len(data.valid_tokens):,} "
        f"valid tokens ({'cache reused' if data.reused else 'tokenized'}: {data.cache_path})"
    )
    print(f"tokenizer {run.tokenizer.name}, {run.tokenizer.vocab_size} ids")
    print(
        f"model     {run.preset}: {c.n_layer} layers, d_model {c.d_model}, {c.n_head} heads, "
        f"{c.n_expert} experts (top-{c.top_k}, hidden {c.d_ff}), block_size {c.block_size}, "
        f"dropout {c.dropout}"
        + ("" if c.attn_dropout is None else f" (attention {c.attn_dropout})")
        + f"\n          {parameter_summary(c)}"
    )
    print(f"hardware  {hardware_facts(rt.device).summary()}")
    print(
        f"device    {rt.device} x {rt.world_size} rank(s), precision {rt.precision} ({rt.precision_reason})"
        f"{', TF32 off' if rt.device.type == 'cuda' else ''}"
        f"{', activation checkpointing' if s.activation_checkpointing else ''}"
        f"{', torch.compile' if s.compile else ''}"
    )
    if s.optimizer == "muon":
        print(f"optimizer Muon (Newton-Schulz in {rt.newton_schulz.reason}) + AdamW")
    else:
        print("optimizer AdamW")
    print(
        f"batch     {s.batch_size} x {s.grad_accum_steps} accum x {rt.world_size} rank(s) x {s.seq_len} "
        f"tokens = {s.tokens_per_step:,} tokens/step, {s.max_steps} steps"
    )
    plan = plan_memory(
        c,
        s.batch_size,
        s.seq_len,
        n_params=count_parameters(c),
        n_muon_params=count_hidden_matrix_parameters(c) if s.optimizer == "muon" else 0,
        precision=rt.precision,
        activation_checkpointing=s.activation_checkpointing,
        on_gpu=rt.device.type == "cuda",
        expert_parallel=s.expert_parallel,
    )
    print(format_memory_plan(plan))
    if run.resume_checkpoint is not None:
        print(
            f"resumed   from {run.resume_checkpoint['path']} at step {state.step} ({state.tokens:,} tokens)"
        )
        if run.changed_on_resume:
            print(f"changed   on resume, from this step on: {', '.join(run.changed_on_resume)}")


class MetricsLog:
    """metrics.jsonl (rank 0 only), and the sums of losses, expert counts, time and tokens since its last
    train record."""

    def __init__(self, run: Run):
        c = run.config
        self.device, self.shape = run.runtime.device, (c.n_layer, c.n_expert)
        self.watch = CollapseWatch(c.n_expert, c.top_k, aux_loss_coef=c.aux_loss_coef)  # routing health
        self.file = open(run.out_dir / METRICS_FILE, "a", encoding="utf-8") if run.runtime.is_main else None
        self.reset()

    def reset(self) -> None:
        self.losses = torch.zeros(4, device=self.device)
        self.counts = torch.zeros(self.shape, device=self.device)
        self.steps, self.time, self.tokens = 0, 0.0, 0

    def add(self, result: dict, seconds: float, tokens: int) -> None:
        self.losses += result["losses"]
        self.counts += result["expert_counts"]
        self.steps, self.time, self.tokens = self.steps + 1, self.time + seconds, self.tokens + tokens

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def write_train_record(self, state: TrainState, lr: float, grad_norm, rt: Runtime) -> dict:
        """The window's mean losses and every rank's expert load per layer; then start a new window."""
        lm, aux, z, total = (self.losses / self.steps).tolist()
        if rt.distributed:  # every rank's routing decisions, not only rank 0's
            torch_dist.all_reduce(self.counts)
        load = self.counts / self.counts.sum(dim=1, keepdim=True).clamp_min(1)  # [L, E]
        record = {
            "kind": "train", "step": state.step, "tokens": state.tokens, "lr": lr, "loss": lm,
            "aux_loss": aux, "z_loss": z, "total_loss": total, "grad_norm": float(grad_norm),
            "tokens_per_s": self.tokens / max(self.time, 1e-9), "train_time_s": state.train_time,
            "expert_load": load.tolist(),
        }  # fmt: skip
        warning = self.watch.update(state.step, record["expert_load"])  # once per run, on a collapse
        if warning:
            record["routing_warning"] = warning
        self.write(record)
        self.reset()
        return record

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def save(run: Run, state: TrainState, is_best: bool) -> None:
    """latest.pt (and best.pt when is_best), atomically, on rank 0; every rank's RNG state goes in.

    Weights that are not finite are never saved: the previous checkpoint stays the good one."""
    rt = run.runtime
    rng = [capture_rng_state()]
    if rt.distributed:
        rng = [None] * rt.world_size
        torch_dist.all_gather_object(rng, capture_rng_state())
    model, optimizer = state.model, state.optimizer
    if isinstance(state.train_model, ExpertParallelModel):  # collective: every rank's experts, gathered
        model, optimizer = state.train_model.full_state(state.optimizer)
    if not rt.is_main:
        return
    if not all(torch.isfinite(p).all() for p in state.model.parameters()):
        raise TrainingDiverged("the weights are not finite; they were not saved")
    save_run_checkpoints(
        run.out_dir,
        model,
        optimizer,
        state.step,
        is_best=is_best,
        tokens=state.tokens,
        preset=run.preset,
        scaler=state.scaler.state_dict(),
        sampler=state.sampler.state_dict(),
        rng=rng,
        config=asdict(run.config),
        train_args=asdict(run.settings),
        tokenizer=run.tokenizer.to_state(),
        best_val_loss=state.best_val,
        train_time_s=state.train_time,
    )


def diverged(run: Run, state: TrainState, err: TrainingDiverged) -> TrainingDiverged:
    """The error a diverged run stops with: the step, what diverged, the last good checkpoint, the fix."""
    latest = run.out_dir / LATEST_NAME
    where = (
        f"the last good checkpoint is {latest} (resume from it with --resume)"
        if latest.exists()
        else "no checkpoint was saved before it"
    )
    return TrainingDiverged(
        f"step {state.step + 1}: {err}: stopped without saving the damaged weights; {where}. "
        "Lower --max-lr, keep --grad-clip on, or use --precision fp32/bf16 instead of fp16"
    )
