"""Serving many requests with one forward pass per step: a padded-batch generation engine.

A server that generates for one request at a time leaves most of the hardware idle: a forward
pass over a batch of B sequences costs far less than B forward passes of one (the weights are
read once, the matrix multiplies are wider). The engine below keeps a list of *active* requests
and, at every step, runs them all through the model together:

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

The cost of the simplicity: without a KV cache every step recomputes each window, O(T) work per
new token instead of O(1). For the small models of this course the batch gain is the larger one
(see BENCHMARKS.md); a production engine (vLLM, TGI) keeps a KV cache per request as well.

Continuous batching: requests join the batch at the next step after they arrive and leave it as
soon as they finish (max_new_tokens, an end-of-text token, an error or a cancel), so a long
request never makes a short one wait for it to finish.

    engine = BatchingEngine(lambda idx: model(idx)[0], context_length=256, max_batch_size=16)
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

from phase5_production.src.sampling import sample_next_token

__all__ = ["GenerationRequest", "BatchingEngine", "padded_batch", "batched_next_token_logits"]


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


class BatchingEngine:
    """A worker thread that generates for every active request with one forward pass per step.

    logits_fn(idx [B, T]) -> logits [B, T, V] must be a causal model in eval mode. max_batch_size
    bounds the rows of one forward pass; further requests wait in arrival order (max_batch_size=1
    serves one request at a time: batching off). `lock` is held during each step.
    """

    def __init__(
        self,
        logits_fn: Callable[[torch.Tensor], torch.Tensor],
        context_length: int,
        max_batch_size: int = 16,
        lock: threading.Lock | None = None,
    ):
        if not isinstance(context_length, int) or context_length < 1:
            raise ValueError(f"context_length must be a positive integer, got {context_length!r}.")
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}.")
        self.logits_fn = logits_fn
        self.context_length = context_length
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
        windows = [r.ids[-self.context_length :] for r in batch]
        try:
            with self.lock:
                logits = batched_next_token_logits(self.logits_fn, windows)  # [B, V]
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
