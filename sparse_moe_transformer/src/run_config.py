"""Flags -> a run: the one place where a preset, a checkpoint's saved values and the command line become
the settings of a run, and where everything that can fail before the first step is checked.

    merge_settings       TrainSettings: the preset's < the checkpoint's saved values < the flags given
                         (every mode: train, eval, benchmark)
    model_config         Config: the checkpoint's on resume, else the preset's with --set overrides;
                         with_vocab_of gives it the tokenizer's vocabulary size
    read_resume_checkpoint, check_resume_flags, check_schedule_on_resume
                         what a resumed run may change, and what it may not
    Run, resolve_run     everything decided before the first step, for the training loop (train.py's `train`)
    TrainState, build_state
                         its model, optimizer, scaler and sampler: fresh, or exactly as a checkpoint left them
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn

from phase4_training.src.training_loop import restore_rng_state
from sparse_moe_transformer.src.batches import BlockBatchSampler
from sparse_moe_transformer.src.checkpointing import (
    LATEST_NAME,
    check_same_config,
    load_model_state,
    read_checkpoint,
)
from sparse_moe_transformer.src.data_sources import data_source_from_flags
from sparse_moe_transformer.src.expert_parallel import (
    ExpertParallelModel,
    check_layout,
    init_expert_parallel,
    keep_local_optimizer_state,
    shard_experts,
)
from sparse_moe_transformer.src.moe_optimizer import make_optimizer
from sparse_moe_transformer.src.rank_checks import TIMEOUT_ENV, check_same_inputs
from sparse_moe_transformer.src.runtime import Runtime, seed_everything, setup_runtime
from sparse_moe_transformer.src.text_tokenizers import tokenizer_from_state
from sparse_moe_transformer.src.token_cache import prepare_data
from sparse_moe_transformer.src.train import (
    PRESETS,
    Config,
    SparseMoETransformer,
    preset_config,
    prompt_ids,
)
from sparse_moe_transformer.src.train_settings import TrainSettings, lr_at


@dataclass
class Run:
    """Everything decided before the first step (run_config.resolve_run: a run that would fail later fails
    there instead)."""

    out_dir: Path
    preset: str
    config: Config
    settings: TrainSettings
    runtime: Runtime
    data: object  # token_cache.PreparedData
    tokenizer: object  # text_tokenizers.TextTokenizer
    sample_prompt: str
    stop_at: int
    resume_checkpoint: dict | None
    changed_on_resume: list[str]
    overwrite: bool = False  # delete the previous run's checkpoints and metrics first


@dataclass
class TrainState:
    model: SparseMoETransformer  # the plain model (what is saved)
    train_model: nn.Module  # the same, wrapped by torch.compile / DDP when asked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: BlockBatchSampler
    step: int = 0
    tokens: int = 0
    best_val: float | None = None
    train_time: float = 0.0  # seconds spent in optimizer steps (evaluation, sampling, saving excluded)


DEFAULT_PRESET = "cpu-demo"
SETTINGS_FIELDS = tuple(f.name for f in fields(TrainSettings))


def merge_settings(preset: str | None, saved: dict | None, flags: dict, config: Config) -> TrainSettings:
    """The preset's training values, replaced by a checkpoint's saved ones (`saved`: its train_args, None
    without a checkpoint), replaced by the flags given (None = not given); seq_len defaults to the model's
    block_size."""
    values = dict(PRESETS.get(preset or DEFAULT_PRESET, PRESETS[DEFAULT_PRESET]).training)
    if saved is not None:
        values.update(TrainSettings.from_saved(saved))
    values.update({k: v for k, v in flags.items() if v is not None})
    values.setdefault("seq_len", config.block_size)
    return TrainSettings(**{k: v for k, v in values.items() if k in SETTINGS_FIELDS})


def model_config(preset: str | None, overrides: dict, saved: dict | None) -> Config:
    """The checkpoint's config when resuming (a different --preset/--set is refused by check_same_config),
    else the preset with the --set overrides. Its vocab_size is a guess until with_vocab_of sets it."""
    if saved is not None and preset is None:
        return Config(**{**saved, **overrides})
    return preset_config(preset or DEFAULT_PRESET, **overrides)


def with_vocab_of(config: Config, overrides: dict, vocab_size: int) -> Config:
    """`config` with the tokenizer's vocabulary size: the vocabulary is the tokenizer's, never a flag's."""
    if "vocab_size" in overrides and overrides["vocab_size"] != vocab_size:
        raise ValueError(
            f"--set vocab_size={overrides['vocab_size']} disagrees with the tokenizer ({vocab_size} ids): "
            "the vocabulary size is taken from the tokenizer; drop it or change --vocab-size"
        )
    return replace(config, vocab_size=vocab_size)


# ----------------------------------------------------------------------------- resuming

RESUME_KEYS = ("model", "optimizer", "sampler", "rng", "train_args", "tokenizer", "config", "step", "tokens")


def read_resume_checkpoint(out_dir: Path, resume: bool, overwrite: bool) -> dict | None:
    """OUT_DIR/latest.pt when resuming (checked to hold what a resume needs), else None."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file: pass a folder for the run's checkpoints")
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out-dir and --overwrite deletes it: choose one")
    if not resume:
        if (out_dir / LATEST_NAME).exists() and not overwrite:
            raise ValueError(
                f"{out_dir / LATEST_NAME} exists: continue it with --resume, choose another --out-dir, "
                "or pass --overwrite to start again from scratch (its checkpoints are then deleted)"
            )
        return None
    ckpt = read_checkpoint(out_dir / LATEST_NAME)
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    if missing:
        raise ValueError(
            f"{ckpt['path']} cannot be resumed: it has no {', '.join(missing)} entr"
            f"{'y' if len(missing) == 1 else 'ies'} (it is damaged or was not written by --mode train); "
            "train into a new --out-dir"
        )
    return ckpt


def check_resume_flags(saved: dict, flags: dict, ckpt: dict, args) -> list[str]:
    """Refuse the flags a resumed run cannot honour; return the changes it will apply ("field old -> new")."""
    if flags.get("optimizer") is not None and flags["optimizer"] != saved["optimizer"]:
        raise ValueError(
            f"--optimizer {flags['optimizer']} differs from the checkpoint's ({saved['optimizer']}): "
            "its optimizer state cannot carry over; drop --optimizer or train into a new --out-dir"
        )
    saved_tokenizer, saved_vocab = ckpt["tokenizer"].get("name"), ckpt["config"].get("vocab_size")
    if args.tokenizer is not None and args.tokenizer != saved_tokenizer:
        raise ValueError(
            f"--tokenizer {args.tokenizer} differs from the checkpoint's tokenizer ({saved_tokenizer}): "
            "a resumed run keeps its tokenizer; drop --tokenizer or train into a new --out-dir"
        )
    if args.vocab_size is not None and args.vocab_size != saved_vocab:
        raise ValueError(
            f"--vocab-size {args.vocab_size} differs from the checkpoint's ({saved_vocab}): "
            "a resumed run keeps its tokenizer; drop --vocab-size or train into a new --out-dir"
        )
    return [
        f"{name} {saved[name]!r} -> {value!r}"
        for name, value in flags.items()
        if value is not None and name in saved and saved[name] != value and name != "world_size"
    ]


# The flags that shape the schedule over the steps (not its height: a new --max-lr is the user's own
# choice and is applied as asked). Changing them on resume re-plans the remaining steps.
SCHEDULE_SHAPE = ("max_steps", "warmup_steps", "lr_schedule", "cooldown_frac")


def check_schedule_on_resume(base: dict, s: TrainSettings, step: int, stop_at_step: int | None) -> None:
    """Refuse a resume whose new schedule shape moves the learning rate of the next step.

    Refusing rather than re-planning from the current lr: a cool-down that restarted at the peak would
    undo the decay the run has already done, and bending the new schedule to start from today's lr is a
    schedule no flag describes. Where the next lr is unchanged (a wsd run extended before its cool-down,
    a cosine run still in its warmup) the new plan applies as it stands, and replan_note announces it."""
    if s.max_steps < step:
        raise ValueError(
            f"--max-steps {s.max_steps} is below the step this run has reached ({step}): the run is past "
            f"that schedule's end; pass --max-steps {step} or more, or evaluate its checkpoint as it is"
        )
    if stop_at_step is not None and stop_at_step <= step:
        raise ValueError(
            f"--stop-at-step {stop_at_step} is not after the step this run has reached ({step}): "
            f"pass a later step, or drop --stop-at-step"
        )
    old = replace(s, **{k: base[k] for k in SCHEDULE_SHAPE if k in base})
    new_lr, old_lr = lr_at(step, s), lr_at(step, old)
    if math.isclose(new_lr, old_lr, rel_tol=1e-9, abs_tol=0.0):
        return
    moved = [k for k in SCHEDULE_SHAPE if getattr(old, k) != getattr(s, k)]
    asked = ", ".join(f"--{k.replace('_', '-')} {getattr(s, k)}" for k in moved)
    keep = ", ".join(f"--{k.replace('_', '-')} {getattr(old, k)}" for k in moved)
    extend = ""
    if old.lr_schedule == "wsd":
        start = wsd_cooldown_start(old) + 1
        extend = f"; a wsd run can be extended before its cool-down starts at step {start}"
    raise ValueError(
        f"{asked} on resume would move the learning rate of step {step + 1} from {old_lr:.3g} to "
        f"{new_lr:.3g} (the schedule is planned over the whole run): keep {keep}, or train into a new "
        f"--out-dir{extend}"
    )


def wsd_cooldown_start(s: TrainSettings) -> int:
    """The 0-based index of the first wsd cool-down step (as lr_at computes it); the log numbers steps
    from 1, so the log calls it step index + 1."""
    return s.max_steps - round(s.cooldown_frac * s.max_steps)


def replan_note(change: str, s: TrainSettings, step: int) -> str:
    """A changed max_steps, announced with the re-planned schedule the remaining steps will follow."""
    if not change.startswith("max_steps "):
        return change
    if s.lr_schedule == "wsd":
        plan = (
            f"lr {lr_at(step, s):.3g}, then a linear cool-down towards {s.min_lr:.3g} over steps "
            f"{wsd_cooldown_start(s) + 1}-{s.max_steps}"
        )
    else:
        plan = f"cosine from lr {lr_at(step, s):.3g} towards {s.min_lr:.3g} by step {s.max_steps}"
    return f"{change} (schedule re-planned: {plan})"


# ----------------------------------------------------------------------------- the run


def training_flags(args) -> dict:
    """The TrainSettings values given on the command line (None = not given)."""
    return {name: getattr(args, name, None) for name in SETTINGS_FIELDS}


def resolve_run(args) -> Run:
    """Settings (flags > checkpoint on resume > preset), runtime, model config, data, and every check
    that would otherwise fail after the first step."""
    out_dir = Path(args.out_dir)
    ckpt = read_resume_checkpoint(out_dir, args.resume, args.overwrite)
    preset = args.preset or (ckpt.get("preset") if ckpt else None) or DEFAULT_PRESET
    saved_settings = TrainSettings.from_saved(ckpt["train_args"]) if ckpt else None
    saved_config = asdict(Config.from_saved(ckpt["config"])) if ckpt else None
    flags = training_flags(args)
    changed = check_resume_flags(saved_settings, flags, ckpt, args) if ckpt else []
    if args.dist_timeout is not None:
        os.environ[TIMEOUT_ENV] = str(args.dist_timeout)  # read by process_group_timeout()

    config = model_config(args.preset, args.overrides, saved_config)  # checked before any data work
    precision = flags["precision"] or (saved_settings or {}).get("precision", "auto")
    ns_dtype = flags["ns_dtype"] or (saved_settings or {}).get("ns_dtype", "auto")
    rt = setup_runtime(args.device, precision, ns_dtype)
    # "auto" is decided once, by timing matmuls, and the decision is saved: a resumed run (another
    # process, whose timings may differ) computes in the same dtypes and repeats the run exactly
    flags.update(precision=rt.precision, ns_dtype=rt.newton_schulz.name)
    # the layout of this launch, never the saved one
    flags.update(world_size=rt.world_size, expert_parallel=args.expert_parallel or 1)
    s = merge_settings(preset, saved_settings, flags, config)
    if s.seq_len > config.block_size:
        raise ValueError(f"--seq-len {s.seq_len} exceeds the model's block_size {config.block_size}")
    if s.expert_parallel > 1:
        check_layout(s.expert_parallel, rt.world_size, config.n_expert, rt.precision, s.compile)

    data = prepare_run_data(args, ckpt, s.seed, rt)
    config = with_vocab_of(config, args.overrides, data.tokenizer.vocab_size)
    if ckpt is not None:
        check_same_config(saved_config, asdict(config), ckpt["path"])
        base = {**PRESETS.get(preset, PRESETS[DEFAULT_PRESET]).training, **saved_settings}
        check_schedule_on_resume(base, s, int(ckpt["step"]), args.stop_at_step)
        changed = [replan_note(c, s, int(ckpt["step"])) for c in changed]
    check_before_training(args, s, config, data)
    stop_at = min(s.max_steps, args.stop_at_step if args.stop_at_step is not None else s.max_steps)
    return Run(
        out_dir, preset, config, s, rt, data, data.tokenizer, args.sample_prompt, stop_at, ckpt, changed,
        args.overwrite,
    )  # fmt: skip


def prepare_run_data(args, ckpt: dict | None, seed: int, rt):
    """Rank 0 tokenizes (and trains the bpe tokenizer) once into the cache; the other ranks then read it.
    A resumed run keeps its checkpoint's tokenizer."""
    tokenizer = tokenizer_from_state(ckpt["tokenizer"]) if ckpt else (args.tokenizer or "bpe")
    if rt.distributed and not rt.is_main:
        torch_dist.barrier()
    data = prepare_data(
        data_source_from_flags(args, seed=seed),
        tokenizer,
        vocab_size=args.vocab_size or 4096,
        cache_dir=args.cache_dir,
        progress=rt.is_main,
    )
    if rt.distributed and rt.is_main:
        torch_dist.barrier()
    if rt.distributed:  # before the first step: ranks that averaged gradients of different data
        check_same_inputs(rt, data.tokenizer, data)
    return data


def check_before_training(args, s: TrainSettings, config: Config, data) -> None:
    """What would otherwise fail after the last step: too little validation text, too long a prompt."""
    if len(data.valid_tokens) < s.seq_len + 1:
        raise ValueError(
            f"the validation split has {len(data.valid_tokens)} tokens, fewer than one sequence of "
            f"--seq-len {s.seq_len} + 1: give more validation text or a smaller --seq-len"
        )
    n_prompt = len(prompt_ids(data.tokenizer, args.sample_prompt))
    if s.sample_tokens and n_prompt >= config.block_size:
        raise ValueError(
            f"--sample-prompt is {n_prompt} tokens, the model's context is {config.block_size}: "
            "shorten it or pass --sample-tokens 0"
        )


def build_state(run: Run) -> TrainState:
    """Model, optimizer, scaler and sampler: fresh, or exactly as the resumed checkpoint left them."""
    s, rt, ckpt = run.settings, run.runtime, run.resume_checkpoint
    seed_everything(s.seed)  # the same initial weights on every rank
    model = SparseMoETransformer(run.config).to(rt.device)
    model.set_activation_checkpointing(s.activation_checkpointing)
    if s.expert_parallel > 1:  # keep this rank's experts only (loading a checkpoint keeps its slice)
        shard_experts(model, init_expert_parallel(s.expert_parallel, run.config.n_expert))
    optimizer = make_optimizer(model, s, rt.device)
    if s.expert_parallel > 1:  # it loads one process's optimizer state and keeps this rank's slices
        keep_local_optimizer_state(optimizer, model)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    sampler = BlockBatchSampler(
        len(run.data.train_tokens), s.seq_len, s.batch_size, s.seed, rt.rank, rt.world_size
    )
    seed_everything(s.seed + rt.rank)  # dropout streams differ between ranks
    state = TrainState(model, model, optimizer, scaler, sampler)
    if ckpt is not None:
        load_model_state(model, ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        sampler.load_state_dict(ckpt["sampler"])
        restore_rng_state(ckpt["rng"][rt.rank % len(ckpt["rng"])])
        state.step, state.tokens = int(ckpt["step"]), int(ckpt["tokens"])
        state.best_val = ckpt.get("best_val_loss")
        state.train_time = float(ckpt.get("train_time_s", 0.0))
    if s.compile:
        state.train_model = torch.compile(model)
    if s.expert_parallel > 1:  # in place of DDP: gradients synced per parameter's holders
        state.train_model = ExpertParallelModel(model)
    elif rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        devices = [rt.local_rank] if rt.device.type == "cuda" else None
        state.train_model = DDP(state.train_model, device_ids=devices)
    model.train()
    return state
