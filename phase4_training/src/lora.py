"""LoRA (Low-Rank Adaptation, Hu et al. 2021) from scratch.

Fine-tuning changes a pretrained weight W0 [out, in] by some update dW. LoRA's bet is that dW has
low rank, so it writes it as a product of two thin matrices and trains only those:

    h = W0 x + dW x,        dW = (alpha / r) * B A,      A [r, in],  B [out, r],  r << min(in, out)

- W0 is frozen; only A and B (r * (in + out) numbers instead of in * out) are trained, so the
  optimizer state (Adam keeps two extra copies of every trained parameter) shrinks by the same factor.
- B starts at zero, so at initialisation dW = 0 and the wrapped model computes exactly what the
  pretrained model did; A starts random (Kaiming-uniform, as in the reference implementation), so
  the gradient with respect to B is not zero and training can start.
- alpha / r scales the update so that changing the rank does not change the effective learning rate.
- After training, dW can be added into W0 ("merge"): inference then costs nothing extra. Subtracting
  it again ("unmerge") gives back the base weights, e.g. to swap in another adapter.

Usage:
    inject_lora(model, target_module_names=("q_proj", "v_proj"), rank=8, alpha=16)
    mark_only_lora_trainable(model)          # everything else frozen
    ... train ...
    merge_lora(model)                        # fold the adapters into the weights for inference
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn as nn

from phase1_foundation.src.validation import check_int, check_number


def _check_lora_hyperparameters(rank: int, alpha: float, dropout: float) -> None:
    check_int("rank (typical values: 4, 8 or 16)", rank, minimum=1)
    check_number("alpha (a common choice: 2 * rank)", alpha, above=0)
    check_number("dropout", dropout, low=0, below=1)


class LoRALinear(nn.Module):
    """An `nn.Linear` plus a trainable low-rank update: y = x W0^T + b + (alpha/r) * dropout(x) A^T B^T.

    The base layer is kept as `self.base` (its parameters are not copied). Call
    `mark_only_lora_trainable` on the whole model to freeze everything but `lora_A` and `lora_B`.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        _check_lora_hyperparameters(rank, alpha, dropout)
        if rank > min(base.in_features, base.out_features):
            raise ValueError(
                f"rank {rank} exceeds min(in_features, out_features) = "
                f"{min(base.in_features, base.out_features)}; a low-rank update needs a smaller rank"
            )
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))  # [out, r]
        # Same init as nn.Linear / the reference LoRA code: A random, B zero  =>  dW = B A = 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update dW = (alpha / r) * B A, shaped like the base weight [out, in]."""
        return self.scaling * (self.lora_B @ self.lora_A)  # [out, r] @ [r, in] -> [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]  (already includes dW once merged)
        if self.merged:
            return y
        # Low-rank path, never forming the [out, in] matrix: x -> [..., r] -> [..., out]
        down = self.lora_dropout(x) @ self.lora_A.T  # [..., in] @ [in, r] -> [..., r]
        up = down @ self.lora_B.T  # [..., r] @ [r, out] -> [..., out]
        return y + self.scaling * up

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + dW. Afterwards forward() is a single plain matmul."""
        if self.merged:
            raise RuntimeError("LoRALinear is already merged; call unmerge() first")
        self.base.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - dW: restores the base weights (up to float rounding)."""
        if not self.merged:
            raise RuntimeError("LoRALinear is not merged; nothing to unmerge")
        self.base.weight -= self.delta_weight()
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


def lora_parameter_count(in_features: int, out_features: int, rank: int) -> int:
    """Trainable numbers LoRA adds to one [out, in] linear layer: A has r*in, B has out*r."""
    return rank * (in_features + out_features)


def _module_matches(name: str, target_module_names: Iterable[str]) -> bool:
    """'blocks.0.attn.q_proj' matches 'q_proj' (last component) or its full dotted name."""
    return any(name == t or name.endswith("." + t) for t in target_module_names)


def inject_lora(
    model: nn.Module,
    target_module_names: Iterable[str] | None = None,
    *,
    predicate: Callable[[str, nn.Linear], bool] | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Replace chosen `nn.Linear` layers of `model` (in place) with `LoRALinear` wrappers.

    Choose the layers either by name (`target_module_names=("q_proj", "v_proj")` matches the last
    component of the dotted module name, or the full name) or with `predicate(name, linear) -> bool`.
    Returns the dotted names of the wrapped layers. Layers that are already LoRALinear are skipped.
    """
    if (target_module_names is None) == (predicate is None):
        raise ValueError("pass exactly one of target_module_names=... or predicate=...")
    _check_lora_hyperparameters(rank, alpha, dropout)
    if target_module_names is not None:
        if isinstance(target_module_names, str):
            target_module_names = (target_module_names,)
        target_module_names = tuple(target_module_names)
        predicate = lambda name, module: _module_matches(name, target_module_names)

    already_wrapped = {id(layer.base) for layer in lora_layers(model)}
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module) not in already_wrapped
    }
    chosen = [name for name, module in linears.items() if predicate(name, module)]
    if not chosen:
        raise ValueError(
            "no nn.Linear layer matched; the model's linear layers are: "
            + ", ".join(sorted(linears)[:20])
            + (" ..." if len(linears) > 20 else "")
        )
    _check_not_tied(model, chosen)
    for name in chosen:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, LoRALinear(linears[name], rank=rank, alpha=alpha, dropout=dropout))
    return chosen


def _check_not_tied(model: nn.Module, chosen: list[str]) -> None:
    """Merging into a weight shared with another module (e.g. a tied lm_head) would change both."""
    names_by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_tensor.setdefault(id(p), []).append(name)
    for name in chosen:
        shared = names_by_tensor[id(model.get_submodule(name).weight)]
        if len(shared) > 1:
            others = [n for n in shared if n != name + ".weight"]
            raise ValueError(
                f"{name}.weight is tied to {others}: merging LoRA into it would change those too; "
                "leave it out of the targets or build the model without weight tying"
            )


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze every parameter except the LoRA matrices (names containing 'lora_')."""
    if not lora_layers(model):
        raise ValueError("the model has no LoRALinear layers; call inject_lora(model, ...) first")
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights: what you save and share after LoRA fine-tuning (a few KB to MB)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
