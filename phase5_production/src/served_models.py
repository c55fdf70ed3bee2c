"""What the server serves: a Phase 2 GPT or a Sparse MoE checkpoint, behind one small interface.

    served = load_served_model("/tmp/demo_gpt.pt")           # Phase 2 GPT + CharTokenizer
    served = load_served_model("runs/moe")                    # a `train.py --mode train` run (best.pt)
    served.encode("Once upon")  -> [ids]    served.decode(ids) -> str
    served.logits(idx [B, T])   -> [B, T, V]        (a causal model in eval mode)
    served.context_length, served.stop_token_ids, served.exact_batching, served.describe()

Phase 2 checkpoints are written by `save_served_checkpoint` (Phase 2's atomic `save_checkpoint`
with two extras: "config" and "tokenizer_chars"). Sparse MoE checkpoints are read by the MoE
package's own `load_trained_model`; Phase 5 imports it lazily, only when such a checkpoint is
served (the one place the course phases reach into sparse_moe_transformer).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase2_architecture.src.training_utils import NonFiniteWeightsError, load_checkpoint, save_checkpoint
from phase3_components.src.char_tokenizer import CharTokenizer
from phase5_production.src.batching import KVCachedGPTStep, PaddedBatchStep

__all__ = [
    "ServedModel",
    "save_served_checkpoint",
    "load_served_checkpoint",
    "load_served_model",
    "moe_context_length",
]


def save_served_checkpoint(path, model: GPT, tokenizer: CharTokenizer, step: int = 0) -> None:
    """Phase 2 save_checkpoint (atomic) + what the server needs to rebuild model and tokenizer."""
    save_checkpoint(
        path, model, step=step, config=dataclasses.asdict(model.config), tokenizer_chars=list(tokenizer.itos)
    )


def _read_torch_file(path: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, random bytes, a pickle with forbidden objects, ...
        first_line = (str(err).splitlines() or [""])[0][:200]
        raise ValueError(
            f"{path!r} is not a readable checkpoint ({type(err).__name__}: {first_line}); it is truncated, "
            "corrupt or not a torch file: write it again (save_served_checkpoint or train.py --mode train)."
        ) from None


def load_served_checkpoint(path) -> tuple[GPT, CharTokenizer]:
    """Rebuild GPT + CharTokenizer from a checkpoint written by save_served_checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no checkpoint at {path!r}; create one with `python phase5_production/src/server.py --demo "
            f"--checkpoint {path}`."
        )
    meta = _read_torch_file(path)
    if not isinstance(meta, dict) or "config" not in meta or "tokenizer_chars" not in meta:
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


def moe_context_length(config) -> int:
    """The Sparse MoE's context length: block_size, as in the Phase 2 GPT."""
    return config.block_size


@dataclasses.dataclass
class ServedModel:
    """A causal language model and its tokenizer, as the server and the batching engine see them."""

    kind: str  # "gpt" (Phase 2) or "moe" (sparse_moe_transformer)
    name: str  # what clients pass as "model" to /v1/completions
    model: nn.Module
    tokenizer: object  # encode(str) -> list[int], decode(ids) -> str, vocab_size
    context_length: int  # tokens the model sees at once; longer contexts slide a window
    stop_token_ids: tuple[int, ...] = ()  # end-of-text ids: generation stops there (not emitted)
    exact_batching: bool = True  # False when rows of a batch interact (MoE expert capacity)

    @classmethod
    def wrap(cls, model: nn.Module, tokenizer, name: str | None = None) -> ServedModel:
        """A Phase 2 GPT + CharTokenizer, or a SparseMoETransformer + its TextTokenizer."""
        if tokenizer.vocab_size != _vocab_size(model):
            raise ValueError(
                f"tokenizer vocab ({tokenizer.vocab_size}) does not match the model's vocab_size "
                f"({_vocab_size(model)})."
            )
        if isinstance(model, GPT):
            return cls("gpt", name or "phase2-gpt", model.eval(), tokenizer, model.config.block_size)
        from sparse_moe_transformer.src.train import SparseMoETransformer

        if isinstance(model, SparseMoETransformer):
            return cls(
                "moe",
                name or "sparse-moe",
                model.eval(),
                tokenizer,
                moe_context_length(model.config),
                stop_token_ids=(tokenizer.eot_id,),
                exact_batching=model.config.capacity_factor is None,
            )
        raise TypeError(f"can serve a Phase 2 GPT or a SparseMoETransformer, got {type(model).__name__}.")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] -> next-token logits at every position [B, T, V]."""
        if self.kind == "gpt":
            return self.model(idx)[0]
        return self.model(idx).logits  # the MoE returns an MoEOutput

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


def _vocab_size(model: nn.Module) -> int:
    return model.config.vocab_size


def _is_phase2_checkpoint(path: Path) -> bool:
    if not path.is_file():
        return False
    meta = _read_torch_file(str(path))
    return isinstance(meta, dict) and "tokenizer_chars" in meta


def load_served_model(path, name: str | None = None) -> ServedModel:
    """A Phase 2 checkpoint (save_served_checkpoint) or a Sparse MoE checkpoint / run folder.

    FileNotFoundError when nothing is there; ValueError for a truncated, corrupt or foreign file.
    """
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}: pass a Phase 2 checkpoint (make one with `server.py --demo "
            "--checkpoint PATH`) or a Sparse MoE run folder / .pt file written by `train.py --mode train`."
        )
    name = name or (path.stem if path.is_file() else path.name)
    if _is_phase2_checkpoint(path):
        model, tokenizer = load_served_checkpoint(path)  # NaN/inf weights refused (Phase 2's loader)
        return ServedModel.wrap(model, tokenizer, name)
    from sparse_moe_transformer.src.train import load_trained_model

    try:
        model, tokenizer, _ = load_trained_model(str(path), torch.device("cpu"))
    except NonFiniteWeightsError:
        raise  # its message already names the file and the tensor
    except ValueError as err:
        raise ValueError(
            f"{err} (this server reads Phase 2 checkpoints written by save_served_checkpoint and Sparse MoE "
            "checkpoints written by train.py --mode train)"
        ) from None
    return ServedModel.wrap(model, tokenizer, name)
