"""Text streaming: a request's generated token ids, read back from the batching engine as text pieces
that are safe to send.

    generation = Generation(server, args, stop)      # submits the request to server.engine
    for piece, index in generation.pieces(client_gone): ...
    generation.cancel()                              # frees its batch row (always call it)

`TextAssembler` turns token ids into text pieces: whole characters only, nothing past a stop string.
"""

from __future__ import annotations

import queue
from typing import TYPE_CHECKING, Iterator

from phase5_production.src.batching import GenerationRequest
from phase5_production.src.served_models import ServedModel
from phase5_production.src.stop_strings import StopMatcher

if TYPE_CHECKING:
    from phase5_production.src.server import GenerationServer


class TextAssembler:
    """Turns generated token ids into text pieces: whole characters only, nothing past a stop string.

    A byte-level BPE token can end inside a multi-byte character (decoded as U+FFFD until the rest
    arrives), and the start of a stop string must not be sent before we know whether the string
    completes. So each new token re-decodes the generated ids and releases only the text that can
    no longer change: up to the first stop string, and short of any tail that may begin one. Only the
    new characters go through the stop-string matchers, so matching is linear in the text.
    """

    def __init__(self, served: ServedModel, stop: tuple[str, ...] = ()):
        self.served, self.stop = served, stop
        self.matchers = [StopMatcher(s) for s in stop]
        self.ids: list[int] = []
        self.text = ""  # the final text so far (cut at a stop string)
        self.sent = 0  # characters of self.text already released
        self.stopped = False
        self.scanned_chars = 0  # characters fed to the matchers (for tests: the work done)

    def add(self, token_id: int) -> str:
        """Append a token; return the new text that is safe to send now (may be '')."""
        if self.stopped:  # the text ended at a stop string: later tokens are not part of it
            return ""
        self.ids.append(token_id)
        text = self.served.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        new, offset = text[len(self.text) :], len(self.text)
        self.text = text
        self.scanned_chars += len(new) * len(self.matchers)
        cuts = [c for c in (m.feed(new, offset) for m in self.matchers) if c is not None]
        if cuts:  # the earliest-starting stop string among those that completed in this token
            self.stopped, self.text = True, text[: min(cuts)]
            return self._release(len(self.text))
        hold = max((m.state for m in self.matchers), default=0)
        return self._release(len(text) - hold)

    def flush(self) -> str:
        """At the end of generation: everything not yet sent (a held-back tail, a partial character)."""
        if not self.stopped:
            self.text = self.served.decode(self.ids)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : upto], upto
        return piece


class ClientGone(Exception):
    """The client closed the connection or stopped reading."""


class Generation:
    """One request submitted to the batching engine, read back as text pieces.

    generation = Generation(server, args, stop)
    try:
        for piece, index in generation.pieces(): ...     # then .finish_reason, .error, .assembler
    finally:
        generation.cancel()                             # frees the batch row if we stopped early
    """

    def __init__(self, server: GenerationServer, args: dict, stop: tuple[str, ...] = ()):
        served = server.served
        self.request = GenerationRequest(
            args["prompt_ids"],
            args["max_new_tokens"],
            temperature=args["temperature"],
            top_k=args.get("top_k"),
            top_p=args["top_p"],
            repetition_penalty=args.get("repetition_penalty", 1.0),
            seed=args["seed"],
            stop_token_ids=served.stop_token_ids,
        )
        self.assembler = TextAssembler(served, stop)
        self.timeout = server.generation_timeout
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.n_tokens = 0
        server.engine.submit(self.request)

    def pieces(self, client_gone=lambda: False) -> Iterator[tuple[str, int]]:
        """(text safe to send, token index) per generated token, until the request ends.

        client_gone() is asked at every token: a client that left raises ClientGone, and the caller's
        cancel() frees its batch row at once instead of after max_new_tokens.
        """
        try:
            for kind, value in self.request.events(timeout=self.timeout):
                if client_gone():
                    raise ClientGone
                if kind == "token":
                    self.n_tokens += 1
                    yield self.assembler.add(value), self.n_tokens - 1
                    if self.assembler.stopped:  # a stop string: end here, free the batch row
                        self.finish_reason = "stop"
                        self.request.cancel()
                        return
                elif kind == "done":
                    self.finish_reason = value
                else:
                    self.finish_reason, self.error = "error", value
        except queue.Empty:
            self.finish_reason, self.error = (
                "error",
                f"no token within {self.timeout} s; the server is overloaded.",
            )
            self.request.cancel()

    def cancel(self) -> None:
        self.request.cancel()
