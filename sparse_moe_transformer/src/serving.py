"""A trained Sparse MoE put to use: read back from its run, and served by Phase 5's server.

    load_trained_model(path, device)    a run folder (best.pt preferred) or .pt -> (model, tokenizer,
                                        checkpoint): what `--mode generate`, `--mode eval` and the server load

Phase 5 never imports this package; it finds this module's `loader` through the entry point that
pyproject.toml declares,

    [project.entry-points."llm_foundation.served_models"]
    moe = "sparse_moe_transformer.src.serving:loader"

which the editable install (`pip install -e .`) registers. Then

    python phase5_production/src/server.py --checkpoint runs/cpu-demo     # the run's best.pt

serves a run folder or checkpoint file written by `train.py --mode train`. Importing this module also
registers the loader in this process (for code that builds a server without the entry point).

    serve_moe(model, tokenizer, name)   a SparseMoETransformer in memory -> ServedModel
    can_load(path, contents)            a MoE checkpoint file, or a run folder holding one
    load(path, name)                    the checkpoint's model and tokenizer -> ServedModel
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from phase5_production.src.served_models import ServedModel, register_loader
from sparse_moe_transformer.src.checkpointing import (
    BEST_NAME,
    CHECKPOINT_FORMAT,
    LATEST_NAME,
    load_model_state,
    read_checkpoint,
)
from sparse_moe_transformer.src.text_tokenizers import TextTokenizer, tokenizer_from_state
from sparse_moe_transformer.src.train import Config, SparseMoETransformer

KIND = "moe"


def load_trained_model(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """A checkpoint (file or run folder; best.pt preferred) -> (model in eval mode, tokenizer, checkpoint).

    The file is read onto the CPU first (a 4 GB GPU never holds two copies of the weights)."""
    checkpoint = read_checkpoint(path)
    config = Config.from_saved(checkpoint["config"])
    model = SparseMoETransformer(config)
    load_model_state(model, checkpoint)
    if "tokenizer" not in checkpoint:
        raise ValueError(f"{checkpoint['path']} holds no tokenizer: it was not written by --mode train")
    tokenizer = tokenizer_from_state(checkpoint["tokenizer"])
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"{checkpoint['path']}: tokenizer ({tokenizer.vocab_size} ids) and model "
            f"(vocab_size {config.vocab_size}) disagree; the checkpoint is damaged"
        )
    return model.to(device).eval(), tokenizer, checkpoint


def serve_moe(model: SparseMoETransformer, tokenizer: TextTokenizer, name: str | None = None) -> ServedModel:
    """A SparseMoETransformer and its tokenizer, as the server sees them.

    Generation stops at end-of-text. With an expert capacity the rows of a batch compete for expert
    slots, so a request's tokens would depend on the others': such a model is served one at a time.
    """
    if not isinstance(model, SparseMoETransformer):
        raise TypeError(f"serve_moe serves a SparseMoETransformer, got {type(model).__name__}.")
    return ServedModel(
        KIND,
        name or "sparse-moe",
        model,
        tokenizer,
        model.config.block_size,
        stop_token_ids=(tokenizer.eot_id,),
        exact_batching=model.config.capacity_factor is None,
    )


def can_load(path: Path, contents: dict | None) -> bool:
    """A checkpoint file of ours (its format entry), or a run folder holding best.pt or latest.pt."""
    if contents is not None:
        return contents.get("format") == CHECKPOINT_FORMAT
    return any((Path(path) / name).is_file() for name in (BEST_NAME, LATEST_NAME))


def load(path: Path, name: str) -> ServedModel:
    """The model (in eval mode, on the CPU) and tokenizer of a run folder (best.pt preferred) or file."""
    model, tokenizer, _ = load_trained_model(path, "cpu")
    return serve_moe(model, tokenizer, name)


loader = register_loader(KIND, can_load, load)
