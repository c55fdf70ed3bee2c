"""What the server serves: a causal language model and its tokenizer, behind one small interface.

    served = load_served_model("/tmp/demo_gpt.pt")           # Phase 2 GPT + CharTokenizer
    served = load_served_model("runs/moe")                    # whatever a registered loader claims
    served.encode("Once upon")  -> [ids]    served.decode(ids) -> str
    served.logits(idx [B, T])   -> [B, T, V]        (a causal model in eval mode)
    served.context_length, served.stop_token_ids, served.exact_batching, served.describe()

Phase 2 checkpoints are written by `save_served_checkpoint` (Phase 2's atomic `save_checkpoint`
with two extras: "config" and "tokenizer_chars") and loaded here. Any other kind of checkpoint is
served through a loader registered with `register_loader(kind, can_load, load)`:

    can_load(path, contents) -> bool    contents: the file's checkpoint dict, or None for a folder
    load(path, name) -> ServedModel     called on the first loader (in registration order) that claims it

A package that comes later in the course (Phase 5 never imports it) makes its models servable by naming
a `ServedModelLoader` in the entry point group `llm_foundation.served_models` of its installed
metadata (pyproject.toml); `load_served_model` reads that group, so an editable install
(`pip install -e .`) is all it takes.
"""

from __future__ import annotations

import dataclasses
import os
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase2_architecture.src.training_utils import (
    NonFiniteWeightsError,
    load_checkpoint,
    read_checkpoint_file,
    save_checkpoint,
)
from phase3_components.src.char_tokenizer import CharTokenizer
from phase5_production.src.batching import KVCachedGPTStep, PaddedBatchStep

__all__ = [
    "ServedModel",
    "ServedModelLoader",
    "LOADER_ENTRY_POINTS",
    "register_loader",
    "registered_loaders",
    "save_served_checkpoint",
    "load_served_checkpoint",
    "load_served_model",
]

LOADER_ENTRY_POINTS = "llm_foundation.served_models"  # the entry point group later packages register in
REMEDY = (
    "write a Phase 2 checkpoint with save_served_checkpoint (or `server.py --demo`), or, for a checkpoint "
    "of another package of this repository, install it with `pip install -e .` so that its loader registers"
)


def save_served_checkpoint(path, model: GPT, tokenizer: CharTokenizer, step: int = 0) -> None:
    """Phase 2 save_checkpoint (atomic) + what the server needs to rebuild model and tokenizer."""
    save_checkpoint(
        path, model, step=step, config=dataclasses.asdict(model.config), tokenizer_chars=list(tokenizer.itos)
    )


def load_served_checkpoint(path) -> tuple[GPT, CharTokenizer]:
    """Rebuild GPT + CharTokenizer from a checkpoint written by save_served_checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no checkpoint at {path!r}; create one with `python phase5_production/src/server.py --demo "
            f"--checkpoint {path}`."
        )
    meta = read_checkpoint_file(path, "write it again with save_served_checkpoint or `server.py --demo`")
    if "config" not in meta or "tokenizer_chars" not in meta:
        raise ValueError(
            f"{path!r} lacks 'config' or 'tokenizer_chars'; write it with save_served_checkpoint "
            "(or `server.py --demo`)."
        )
    try:
        model = GPT(GPTConfig(**meta["config"]))
        load_checkpoint(path, model)  # validates the weights against the model, and that they are finite
    except NonFiniteWeightsError:
        raise  # its message already names the file and the tensor
    except (TypeError, ValueError, RuntimeError, KeyError) as err:  # a wrong config, missing weights
        detail = " ".join(str(err).split())[:200]
        raise ValueError(
            f"{path!r} does not hold a Phase 2 GPT matching its config ({detail} ...); write it again with "
            "save_served_checkpoint."
        ) from None
    tokenizer = CharTokenizer(meta["tokenizer_chars"])
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} characters but the model's vocab_size is "
            f"{model.config.vocab_size}; the checkpoint is inconsistent."
        )
    return model.eval(), tokenizer


@dataclasses.dataclass
class ServedModel:
    """A causal language model and its tokenizer, as the server and the batching engine see them.

    `model(idx)` returns the logits first in a tuple (Phase 2's (logits, loss)) or as `.logits`.
    """

    kind: str  # which loader made it: "gpt" (Phase 2), or the kind a registered loader names
    name: str  # what clients pass as "model" to /v1/completions
    model: nn.Module
    tokenizer: object  # encode(str) -> list[int], decode(ids) -> str, vocab_size
    context_length: int  # tokens the model sees at once; longer contexts slide a window
    stop_token_ids: tuple[int, ...] = ()  # end-of-text ids: generation stops there (not emitted)
    exact_batching: bool = True  # False when rows of a batch interact (an expert capacity)

    def __post_init__(self):
        if self.tokenizer.vocab_size != self.model.config.vocab_size:
            raise ValueError(
                f"tokenizer vocab ({self.tokenizer.vocab_size}) does not match the model's vocab_size "
                f"({self.model.config.vocab_size})."
            )
        self.model.eval()

    @classmethod
    def wrap(cls, model: nn.Module, tokenizer, name: str | None = None) -> ServedModel:
        """A Phase 2 GPT and its tokenizer (another model: build its ServedModel, as its loader does)."""
        if not isinstance(model, GPT):
            raise TypeError(
                f"ServedModel.wrap serves a Phase 2 GPT, got {type(model).__name__}: build a ServedModel "
                "for it (its package's loader does: see register_loader)."
            )
        return cls("gpt", name or "phase2-gpt", model, tokenizer, model.config.block_size)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] -> next-token logits at every position [B, T, V]."""
        out = self.model(idx)
        return out[0] if isinstance(out, tuple) else out.logits  # Phase 2: (logits, loss); else .logits

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; ValueError naming the characters a char tokenizer does not know."""
        if isinstance(self.tokenizer, CharTokenizer):
            unknown = sorted({ch for ch in text if ch not in self.tokenizer.stoi})
            if unknown:
                raise ValueError(
                    f"the prompt contains characters the model's tokenizer does not know: {unknown[:10]}; "
                    f"use only these characters: {''.join(self.tokenizer.itos)!r}."
                )
        return list(self.tokenizer.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def next_token_step(self, kv_cache: bool = True):
        """How the batching engine gets next-token logits: per-request KV caches for the Phase 2 GPT
        (kv_cache=True), else one right-padded forward pass over each request's whole window."""
        if self.kind == "gpt" and kv_cache:
            return KVCachedGPTStep(self.model)
        return PaddedBatchStep(self.logits, self.context_length)

    def describe(self) -> dict:
        """The model's config as plain data, for GET /health."""
        return dataclasses.asdict(self.model.config)


# ---------------------------------------------------------------------------------------------
# Loaders: which code turns a checkpoint path into a ServedModel
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServedModelLoader:
    """One kind of checkpoint the server can load (see the module docstring for the two functions)."""

    kind: str
    can_load: Callable[[Path, dict | None], bool]
    load: Callable[[Path, str], ServedModel]


_LOADERS: dict[str, ServedModelLoader] = {}
_ENTRY_POINTS_READ = False


def register_loader(kind: str, can_load, load) -> ServedModelLoader:
    """Serve another kind of checkpoint; registering a kind again replaces its loader."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"a loader's kind must be a non-empty string, got {kind!r}.")
    if not callable(can_load) or not callable(load):
        raise TypeError(f"loader {kind!r}: can_load and load must be callables.")
    loader = ServedModelLoader(kind, can_load, load)
    _LOADERS[kind] = loader
    return loader


def registered_loaders() -> list[ServedModelLoader]:
    """Every loader: Phase 2's, those registered in this process, and those installed packages name in
    the entry point group `llm_foundation.served_models` (each imported once, on first use)."""
    global _ENTRY_POINTS_READ
    if not _ENTRY_POINTS_READ:
        for entry_point in entry_points(group=LOADER_ENTRY_POINTS):
            try:
                loader = entry_point.load()
            except Exception as err:  # a stale install naming a module that moved, a broken import, ...
                raise ImportError(
                    f"the served-model loader {entry_point.name!r} = {entry_point.value!r} (entry points "
                    f"{LOADER_ENTRY_POINTS!r}) cannot be imported ({type(err).__name__}: {err}); reinstall "
                    "the repository with `pip install -e .`."
                ) from err
            register_loader(loader.kind, loader.can_load, loader.load)
        _ENTRY_POINTS_READ = True
    return list(_LOADERS.values())


def _is_phase2_checkpoint(path: Path, contents: dict | None) -> bool:
    return contents is not None and "tokenizer_chars" in contents


def _load_phase2_checkpoint(path: Path, name: str) -> ServedModel:
    model, tokenizer = load_served_checkpoint(path)  # NaN/inf weights refused (Phase 2's loader)
    return ServedModel.wrap(model, tokenizer, name)


register_loader("gpt", _is_phase2_checkpoint, _load_phase2_checkpoint)


def load_served_model(path, name: str | None = None) -> ServedModel:
    """The ServedModel of a checkpoint file or run folder, made by the first loader that claims it.

    FileNotFoundError when nothing is there; ValueError for a truncated, corrupt or foreign file, and
    for one no registered loader claims (naming the loaders and the fix).
    """
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}: pass a Phase 2 checkpoint (make one with `server.py --demo "
            "--checkpoint PATH`), or a checkpoint file or run folder a registered loader serves."
        )
    name = name or (path.stem if path.is_file() else path.name)
    contents = read_checkpoint_file(path, REMEDY) if path.is_file() else None
    loaders = registered_loaders()
    for loader in loaders:
        if loader.can_load(path, contents):
            return loader.load(path, name)
    what = f"{str(path)!r} is not a checkpoint" if path.is_file() else f"no checkpoint in {str(path)!r}"
    kinds = ", ".join(loader.kind for loader in loaders)
    raise ValueError(f"{what} that a registered loader ({kinds}) serves: {REMEDY}.")
