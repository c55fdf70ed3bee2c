"""Serving many requests with one forward pass per step: a continuous-batching generation engine.

A server that generates for one request at a time leaves most of the hardware idle: a forward
pass over a batch of B sequences costs far less than B forward passes of one (the weights are
read once, the matrix multiplies are wider). The engine below keeps a list of *active* requests
and, at every step, runs them all through the model together. The simplest way, for any causal
model (`PaddedBatchStep`):

    windows     w_i = the last `context_length` token ids of request i     (prompt + generated)
    batch       idx [B, T_max]: row i = w_i followed by padding             (right-padding)
    forward     logits = model(idx)                                         [B, T_max, V]
    read        row i's next-token logits at ITS last real position: logits[i, len(w_i) - 1]
    sample      Phase 5's sample_next_token, with request i's own knobs and seeded generator

Why this is exact for ANY causal model, with no attention mask and no cache: position t of a
causal model only sees positions <= t, so the padding after a row's last real token can never
change that token's logits. Row i therefore gets the logits it would get alone (up to float
rounding of a wider matrix multiply), and with greedy decoding exactly the same tokens; each
request samples with its own `torch.Generator`, so a seeded request also draws what it draws
alone. (A Sparse MoE with an expert *capacity* limit is the exception: its tokens compete for
expert slots across the batch, padding included; serve such a model with max_batch_size=1.)

The cost of that simplicity: without a KV cache every step recomputes each window, O(T) work per
new token instead of O(1). So for the Phase 2 GPT the engine keeps one Phase 5 `KVCache` per
request instead (`KVCachedGPTStep`): a new request is prefilled alone, and then every step feeds
each request its one newest token, all in ONE batched forward pass:

    row i       its new token at position L_i = the length of its cache
    keys        K [B, H, L_max + 1, Dh]: row i's cached keys in columns 0 .. L_i - 1, padding, and
                its new key in the last column (values alike)
    mask        row i may attend column j  iff  j < L_i  or  j = L_max      (the padding is never seen)

Each row's attention covers exactly its own cache plus its new token, as `forward_with_cache` does
alone, so it gets the same logits; the new keys and values are appended to each request's cache.

Continuous batching: requests join the batch at the next step after they arrive and leave it as
soon as they finish (max_new_tokens, an end-of-text token, an error or a cancel), so a long
request never makes a short one wait for it to finish.

    engine = BatchingEngine(PaddedBatchStep(lambda idx: model(idx)[0], 256), max_batch_size=16)  # any model
    engine = BatchingEngine(KVCachedGPTStep(gpt), max_batch_size=16)  # the Phase 2 GPT
    request = engine.submit(GenerationRequest(prompt_ids, max_new_tokens=50, temperature=0))
    for event in request.events():      # ("token", id) ... then ("done", reason) or ("error", message)
        ...
    engine.close()
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
from typing import Callable, Iterator

import torch

from phase1_foundation.src.attention_mechanism import scaled_dot_product_attention
from phase1_foundation.src.validation import check_int
from phase2_architecture.src.gpt import GPT
from phase2_architecture.src.rotary_attention import RotaryMultiHeadAttention
from phase5_production.src.kv_cache import KVCache, forward_with_cache
from phase5_production.src.sampling import sample_next_token

__all__ = [
    "GenerationRequest",
    "BatchingEngine",
    "PaddedBatchStep",
    "KVCachedGPTStep",
    "padded_batch",
    "batched_next_token_logits",
    "batched_cached_decode",
]


@dataclasses.dataclass(eq=False)
class GenerationRequest:
    """One client's generation: its prompt, its sampling knobs, and a queue of what it produced.

    The engine thread writes events into `self.queue`; the client's thread reads them with
    `events()`. A client that goes away calls `cancel()`, and the engine drops the request at its
    next step.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # e.g. the tokenizer's end-of-text id (not emitted)

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError("prompt_ids must hold at least one token id.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.")
        self.ids = list(self.prompt_ids)  # prompt + generated so far
        self.generated: list[int] = []
        self.generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        self.queue: queue.Queue = queue.Queue()
        self.finish_reason: str | None = None  # "length" | "stop" | "cancelled" | "error"
        self.cache: KVCache | None = None  # KVCachedGPTStep's cache of this request
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def events(self, timeout: float | None = None) -> Iterator[tuple[str, object]]:
        """Yield ("token", id) per new token, then one ("done", reason) or ("error", message)."""
        while True:
            kind, value = self.queue.get(timeout=timeout)
            yield kind, value
            if kind != "token":
                return

    # called by the engine thread only
    def _finish(self, reason: str, message: str | None = None) -> None:
        self.finish_reason = reason
        self.queue.put(("error", message) if reason == "error" else ("done", reason))


def padded_batch(windows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token windows into idx [B, T_max]; also return their lengths [B]."""
    lengths = torch.tensor([len(w) for w in windows])  # [B]
    idx = torch.full((len(windows), int(lengths.max())), pad_id, dtype=torch.long)  # [B, T_max]
    for row, window in enumerate(windows):
        idx[row, : len(window)] = torch.tensor(window, dtype=torch.long)
    return idx, lengths


@torch.no_grad()
def batched_next_token_logits(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: list[list[int]]
) -> torch.Tensor:
    """One forward pass for every window: the next-token logits of each, [B, V].

    Each row's logits are read at its own last real position; causality makes the padding after
    it invisible, so row i equals logits_fn(window_i alone)[0, -1] (up to float rounding).
    """
    idx, lengths = padded_batch(windows)  # [B, T_max], [B]
    logits = logits_fn(idx)  # [B, T_max, V]
    return logits[torch.arange(len(windows)), lengths - 1]  # [B, V]


class PaddedBatchStep:
    """Next-token logits for a batch of requests from one right-padded forward pass (any causal model).

    logits_fn(idx [B, T]) -> [B, T, V]; each request's window is its last context_length tokens.
    """

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], context_length: int):
        if not isinstance(context_length, int) or context_length < 1:
            raise ValueError(f"context_length must be a positive integer, got {context_length!r}.")
        self.logits_fn, self.context_length = logits_fn, context_length

    def __call__(self, batch: list[GenerationRequest]) -> torch.Tensor:
        windows = [r.ids[-self.context_length :] for r in batch]
        return batched_next_token_logits(self.logits_fn, windows)  # [B, V]


@torch.no_grad()
def batched_cached_decode(model: GPT, tokens: list[int], caches: list[KVCache]) -> torch.Tensor:
    """Feed each row its one new token after its own cache (lengths may differ); return logits [B, V].

    Appends each row's new keys and values to its cache, as forward_with_cache does for one row.
    """
    B = len(tokens)
    lengths = torch.tensor([cache.length for cache in caches])  # [B] = the position of each new token
    L = int(lengths.max())
    idx = torch.tensor(tokens, dtype=torch.long)[:, None]  # [B, 1]
    x = model.tok_emb(idx)  # [B, 1, C]
    if model.pos_emb is not None:  # learned positions; RoPE rotates q and k in each layer instead
        x = x + model.pos_emb(lengths)[:, None, :]
    x = model.drop(x)
    column = torch.arange(L + 1)  # [L + 1]
    mask = (column[None, :] < lengths[:, None]) | (column[None, :] == L)  # [B, L + 1]
    mask = mask[:, None, None, :]  # [B, 1, 1, L + 1]: broadcast over heads and the one query
    for layer, block in enumerate(model.blocks):
        attn, h = block.attn, block.ln1(x)
        q = attn.split_heads(attn.q_proj(h))  # [B, H, 1, Dh]
        k = attn.split_kv_heads(attn.k_proj(h))  # [B, H_kv, 1, Dh] (H_kv < H with grouped-query attention)
        v = attn.split_kv_heads(attn.v_proj(h))  # [B, H_kv, 1, Dh]
        if isinstance(attn, RotaryMultiHeadAttention):  # rotate each row by its own position
            q = torch.cat([attn.rope(q[r : r + 1], n) for r, n in enumerate(lengths.tolist())])
            k = torch.cat([attn.rope(k[r : r + 1], n) for r, n in enumerate(lengths.tolist())])
        keys = k.new_zeros(B, k.shape[1], L + 1, k.shape[3])  # [B, H_kv, L + 1, Dh]
        values = torch.zeros_like(keys)
        for row, (cache, n) in enumerate(zip(caches, lengths.tolist())):
            keys[row, :, :n], values[row, :, :n] = cache.keys[layer][0], cache.values[layer][0]
            cache.append(layer, k[row : row + 1], v[row : row + 1])  # (cache.length now counts layer 0)
        keys[:, :, L], values[:, :, L] = k[:, :, 0], v[:, :, 0]
        keys, values = attn.repeat_kv(keys), attn.repeat_kv(values)  # [B, H, L + 1, Dh]
        out, _ = scaled_dot_product_attention(q, keys, values, mask)  # [B, H, 1, Dh]
        x = x + attn.out_proj(attn.merge_heads(out))  # pre-norm residuals, as in the GPT's blocks
        x = x + block.ffn(block.ln2(x))
    return model.lm_head(model.ln_f(x))[:, -1]  # [B, V]


class KVCachedGPTStep:
    """Next-token logits for a batch of requests to a Phase 2 GPT, with one KVCache per request.

    A request without a cache (new), or whose cache fills the context (the window slides, as in
    stream_with_cache), is prefilled alone from its last block_size tokens; all the others decode
    their newest token together in one `batched_cached_decode`.
    """

    def __init__(self, model: GPT):
        if not isinstance(model, GPT):
            raise TypeError(f"KVCachedGPTStep serves a Phase 2 GPT, got {type(model).__name__}.")
        if model.training:
            raise ValueError("call model.eval() first: dropout would make cached and batched passes differ.")
        self.model = model
        self.block_size = model.config.block_size

    def __call__(self, batch: list[GenerationRequest]) -> torch.Tensor:
        logits: list[torch.Tensor | None] = [None] * len(batch)
        decode_rows = []
        for row, request in enumerate(batch):
            if request.cache is None or request.cache.length == self.block_size:
                request.cache = KVCache.for_model(self.model)
                window = torch.tensor([request.ids[-self.block_size :]], dtype=torch.long)  # [1, T]
                logits[row] = forward_with_cache(self.model, window, request.cache)[0, -1]  # prefill -> [V]
            else:
                decode_rows.append(row)
        if decode_rows:
            new_tokens = [batch[row].ids[-1] for row in decode_rows]
            decoded = batched_cached_decode(self.model, new_tokens, [batch[row].cache for row in decode_rows])
            for i, row in enumerate(decode_rows):
                logits[row] = decoded[i]
        return torch.stack(logits)  # [B, V]


class BatchingEngine:
    """A worker thread that generates for every active request with one forward pass per step.

    next_token_logits(batch of requests) -> logits [B, V]: a PaddedBatchStep or a KVCachedGPTStep.
    max_batch_size bounds the rows of one step; further requests wait in arrival order
    (max_batch_size=1 serves one request at a time: batching off). `lock` is held during each step.
    """

    def __init__(
        self,
        next_token_logits: Callable[[list[GenerationRequest]], torch.Tensor],
        max_batch_size: int = 16,
        lock: threading.Lock | None = None,
    ):
        check_int("max_batch_size", max_batch_size, minimum=1)
        self.next_token_logits = next_token_logits
        self.max_batch_size = max_batch_size
        self.lock = lock or threading.Lock()
        self.steps = 0  # forward passes run (for tests and benchmarks)
        self.largest_batch = 0
        self._pending: collections.deque[GenerationRequest] = collections.deque()
        self._active: list[GenerationRequest] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="batching-engine", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed.")
            self._pending.append(request)
            self._wake.notify()
        return request

    @property
    def active_requests(self) -> int:
        """Requests in the batch or waiting for it."""
        with self._wake:
            return len(self._active) + len(self._pending)

    def close(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    # --------------------------------------------------------------------------- the worker

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._pending and not self._active:
                    self._wake.wait()
                if self._closed:
                    for request in [*self._active, *self._pending]:
                        request._finish("error", "the server is shutting down.")
                    return
                # continuous batching: admit waiting requests into free rows
                while self._pending and len(self._active) < self.max_batch_size:
                    self._active.append(self._pending.popleft())
                for request in self._active:
                    if request.cancelled:
                        request._finish("cancelled")
                batch = [r for r in self._active if not r.cancelled]
            if batch:
                self._step(batch)
            with self._wake:
                self._active = [r for r in self._active if r.finish_reason is None]

    def _step(self, batch: list[GenerationRequest]) -> None:
        """One forward pass for the whole batch, then one sampled token per request."""
        try:
            with self.lock:
                logits = self.next_token_logits(batch)  # [B, V]
        except Exception as err:  # a failed forward fails every request in it, not the engine
            for request in batch:
                request._finish("error", f"the model failed: {type(err).__name__}: {err}")
            return
        self.steps += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        for row, request in enumerate(batch):
            try:
                token = self._sample(request, logits[row : row + 1])
            except Exception as err:  # e.g. non-finite logits: this request fails, the others go on
                request._finish("error", f"sampling failed: {type(err).__name__}: {err}")
                continue
            if token in request.stop_token_ids:
                request._finish("stop")
                continue
            request.ids.append(token)
            request.generated.append(token)
            request.queue.put(("token", token))
            if len(request.generated) == request.max_new_tokens:
                request._finish("length")

    @staticmethod
    def _sample(request: GenerationRequest, logits: torch.Tensor) -> int:
        """logits [1, V] -> this request's next token, with its knobs and its own generator."""
        previous = None
        if request.repetition_penalty != 1.0:
            previous = torch.tensor([request.ids], dtype=torch.long)  # [1, T] prompt + generated
        token = sample_next_token(
            logits,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            repetition_penalty=request.repetition_penalty,
            previous_ids=previous,
            generator=request.generator,
        )  # [1]
        return int(token[0])
