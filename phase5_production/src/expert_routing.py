"""Which experts each token went to, served as data: the `return_routing` extension of /v1/completions.

A served model reports its routing when it has a method

    model.token_routing(idx [1, T]) -> .experts [1, T, L, k] (expert ids), .weights [1, T, L, k]
                                       (their routing weights), .probs [1, T, L, E] (the full router)

The Sparse MoE has one (sparse_moe_transformer/src/train.py); the Phase 2 GPT, which has no experts,
does not. Phase 5 only calls the method: any served model that has it reports its routing.

What "the routing of token t" means here: the experts the model sends token t to when it reads
the text up to t, in the window the server generates with (the last context_length tokens). While
the text fits in the context, that is one forward pass over the text so far: a causal model's
position t sees nothing after t. Past the context, token t is read in the window that ends at t,
as the batching engine read it. (A model with an expert capacity lets the tokens of one pass
compete for expert slots, so there the routing also depends on which tokens were read together.)

A request with "return_routing": true gets, in every chunk, the tokens not reported before (the
first chunk also carries the prompt's):

    "routing": [{"index": 0, "token": 412, "text": "Once", "prompt": true,
                 "experts": [[3, 0], [1, 2]],        # per layer: the top_k experts, best first
                 "weights": [[0.71, 0.29], ...]}, ...]   # per layer: their routing weights
"""

from __future__ import annotations

import threading
import weakref

import torch

__all__ = [
    "routing_available",
    "describe_routing",
    "check_return_routing",
    "routing_entries",
    "RoutingReport",
]

_DESCRIPTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def routing_available(served) -> bool:
    """True when the served model can say which experts its tokens went to."""
    return callable(getattr(served.model, "token_routing", None))


def describe_routing(served) -> dict | None:
    """The routing's shape for clients (GET /health): {"n_layer", "n_expert", "top_k",
    "capacity_factor"}, or None for a model without experts. Read once per model from one token."""
    if not routing_available(served):
        return None
    if served.model not in _DESCRIPTIONS:
        routing = served.model.token_routing(torch.zeros(1, 1, dtype=torch.long))
        _, _, n_layer, top_k = routing.experts.shape
        _DESCRIPTIONS[served.model] = {
            "n_layer": n_layer,
            "n_expert": routing.probs.shape[-1],
            "top_k": top_k,
            "capacity_factor": getattr(getattr(served.model, "config", None), "capacity_factor", None),
        }
    return dict(_DESCRIPTIONS[served.model])


def check_return_routing(value, served) -> bool:
    """The request's "return_routing" field; ValueError naming the problem and the fix."""
    if not isinstance(value, bool):
        raise ValueError(f"'return_routing' must be true or false, got {value!r}.")
    if value and not routing_available(served):
        raise ValueError(
            f"'return_routing': the served model {served.name!r} ({served.kind}) has no experts, so there is "
            "no routing to return; leave the field out."
        )
    return value


def _entry(served, routing, row: int, ids: list[int], position: int, n_prompt: int) -> dict:
    """One token's entry from row `row` of a token_routing result."""
    token = ids[position]
    return {
        "index": position,
        "token": token,
        "text": served.decode([token]),
        "prompt": position < n_prompt,
        "experts": routing.experts[0, row].tolist(),  # [L, k]
        "weights": routing.weights[0, row].float().tolist(),  # [L, k]
    }


@torch.no_grad()
def routing_entries(served, ids: list[int], start: int, n_prompt: int, lock=None) -> list[dict]:
    """The routing of tokens ids[start:], each read in its own context window (module docstring).

    Tokens inside the first window share one forward pass; each later token needs the window that
    ends at it. `lock` (the server's model lock) is held during each forward pass.
    """
    lock = lock or threading.Lock()
    ctx = served.context_length
    entries = []
    first_end = min(len(ids), ctx)  # positions < ctx are read from the start of the text
    if start < first_end:
        with lock:
            routing = served.model.token_routing(torch.tensor([ids[:first_end]]))  # [1, first_end, L, k]
        entries += [_entry(served, routing, t, ids, t, n_prompt) for t in range(start, first_end)]
    for t in range(max(start, ctx), len(ids)):
        with lock:
            routing = served.model.token_routing(torch.tensor([ids[t - ctx + 1 : t + 1]]))  # [1, ctx, L, k]
        entries.append(_entry(served, routing, ctx - 1, ids, t, n_prompt))
    return entries


class RoutingReport:
    """The routing of one request's tokens, reported once each, prompt first.

    report = RoutingReport(served, prompt_ids, lock)
    report.new_entries(completion_ids)   # entries of the tokens not reported before
    """

    def __init__(self, served, prompt_ids: list[int], lock=None):
        self.served, self.prompt_ids, self.lock = served, list(prompt_ids), lock
        self.reported = 0  # tokens (prompt + completion) reported so far

    def new_entries(self, completion_ids: list[int]) -> list[dict]:
        ids = self.prompt_ids + list(completion_ids)
        entries = routing_entries(self.served, ids, self.reported, len(self.prompt_ids), self.lock)
        self.reported = len(ids)
        return entries
