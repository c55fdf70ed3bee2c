"""An HTTP server for Phase 2 GPT and Sparse MoE checkpoints: OpenAI-compatible, batched, hardened.

    python phase5_production/src/server.py --demo --checkpoint /tmp/demo_gpt.pt   # train ~30 s, then serve
    python phase5_production/src/server.py --checkpoint /tmp/demo_gpt.pt          # a Phase 2 checkpoint
    python phase5_production/src/server.py --checkpoint runs/moe                  # a Sparse MoE run (best.pt)
    curl http://127.0.0.1:8000/health
    curl -N -X POST http://127.0.0.1:8000/generate -d '{"prompt": "Once upon", "max_new_tokens": 50}'
    curl -X POST http://127.0.0.1:8000/v1/completions \
         -d '{"model": "demo_gpt", "prompt": "Once upon", "max_tokens": 50, "stream": true}'

    from openai import OpenAI               # the official client works unchanged
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="demo_gpt", prompt="Once upon", max_tokens=50).choices[0].text

Endpoints
    GET  /                 the playground page (playground_page.py): stream a text, see its experts
    GET  /health           {"status": "ok", "kind": "gpt"|"moe", "model": {...config...}, "vocab_size", ...}
    GET  /v1/models        the one served model (its name is the checkpoint's file or folder name)
    POST /v1/completions   OpenAI's completions API: model, prompt, max_tokens, temperature, top_p,
                           stop (at most 4, of at most 256 characters), seed, n (1), stream;
                           presence_penalty, frequency_penalty, best_of, logit_bias, echo,
                           suffix, logprobs and user only at their neutral values. Non-streamed:
                           one JSON object with choices and usage; streamed: server-sent events
                           of text_completion chunks, then `data: [DONE]`.
                           Errors: {"error": {"message", "type", "param", "code"}}.
                           Our extension: "return_routing": true adds each token's experts to every
                           chunk, for a model with experts (expert_routing.py).
    POST /generate         this course's streaming endpoint: {"prompt", "max_new_tokens", "temperature",
                           "top_k", "top_p", "repetition_penalty", "seed"} -> one event per token
                           data: {"token": "a", "index": 0} ... data: {"done": true, "text": "...", ...}

Every bad request gets a 4xx JSON error naming the problem and the fix (not JSON, too deep or too
large a number, unknown fields, out-of-range parameters: 400; a body sent too slowly: 408; no
Content-Length: 411; too large: 413; wrong path / method: 404 / 405). A failure found while
streaming (the model returned non-finite logits, ...) ends the stream with an error event.

Robustness: a request's line and headers must arrive within a header deadline (a fifth of
--read-timeout) of its first byte, its body within --read-timeout, and a connection idle for
--read-timeout is closed, so a silent, stalled or trickling (slow-loris) client cannot hold its
thread. An idle connection holds no slot and is closed, oldest first, when a new one needs room;
at most --max-connections generation requests run at once (the next get 503 at once) and GET
/health never waits for a slot. A client that leaves mid-request frees its batch row at the next
token. Prompts longer than the model's context are refused (400 naming the limit), not cut.

Generation: a `BatchingEngine` (batching.py) runs all requests in flight through one forward
pass per step; each gets exactly the tokens it would get alone. The server binds to 127.0.0.1
unless told otherwise (--host).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

from phase5_production.src.batching import BatchingEngine, GenerationRequest, KVCachedGPTStep
from phase5_production.src.expert_routing import RoutingReport, check_return_routing, describe_routing
from phase5_production.src.playground_page import playground_file
from phase5_production.src.served_models import (
    ServedModel,
    load_served_checkpoint,  # noqa: F401 - re-exported: `from ...server import load_served_checkpoint`
    load_served_model,
    save_served_checkpoint,
)
from phase5_production.src.stop_strings import StopMatcher

MAX_BODY_BYTES = 64 * 1024
DEFAULT_LIMITS = {"max_prompt_chars": 2000, "max_new_tokens": 500}
# logits / T must stay finite in float32: below this (but above 0 = greedy) the softmax overflows.
MIN_TEMPERATURE = 0.01
MIN_TOP_P = 1e-6  # a smaller top_p keeps only the argmax, and below ~1e-38 it underflows to 0 in float32
GENERATE_FIELDS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream")
COMPLETION_FIELDS += ("return_routing",)  # our extension (expert_routing.py), not OpenAI's
MAX_STOP_SEQUENCES = 4  # as OpenAI
# The text that could still begin a stop string is held back from the stream, so a stop string's length
# is the longest delay a streamed piece can suffer; OpenAI's clients send short ones ("\n", "###").
MAX_STOP_CHARS = 256
# OpenAI fields this server does not implement, with the value that means "off". Clients send these by
# default, so the neutral value is accepted (and ignored); any other value is a 400, never ignored.
NEUTRAL_FIELDS = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "best_of": 1,
    "logit_bias": {},
    "echo": False,
    "suffix": "",
    "logprobs": None,  # null: no log-probabilities (nulls are dropped first, so any value is refused)
}


class RequestError(Exception):
    """A client error: HTTP status + a message that names the problem and the fix."""

    def __init__(self, status: HTTPStatus, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def _bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(HTTPStatus.BAD_REQUEST, message, param)


# ---------------------------------------------------------------------------------------------
# Request validation
# ---------------------------------------------------------------------------------------------


def _json_object(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 naming what is wrong with it."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(f"the body is not valid UTF-8 JSON ({err}); send a JSON object.") from None
    except RecursionError:
        raise _bad("the body's JSON is nested too deeply; send a flat JSON object.") from None
    except ValueError as err:  # e.g. an integer literal of more than 4300 digits
        raise _bad(
            f"the body's JSON holds a value Python refuses to parse ({err}); send smaller numbers."
        ) from None
    if not isinstance(body, dict):
        raise _bad('the body must be a JSON object such as {"prompt": "Once"}.')
    _check_unicode(body)
    return body


def _check_unicode(body: dict) -> None:
    """JSON may escape a lone UTF-16 surrogate (\\ud800), which is no character: refuse it by field."""
    for name, value in body.items():
        for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
            if not isinstance(text, str):
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise _bad(
                    f"'{name}' holds invalid Unicode: a lone surrogate at character {err.start}; send text "
                    "whose \\ud800-\\udfff escapes come in high-low pairs.",
                    name,
                ) from None


def _check_fields(body: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise _bad(f"unknown field(s) {unknown}; this endpoint accepts: {list(allowed)}.", unknown[0])


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None and default is None:
        return None
    kind = "an integer" if integer else "a number"
    wrong_type = not isinstance(value, int if integer else (int, float)) or isinstance(value, bool)
    if wrong_type:
        raise _bad(f"'{name}' must be {kind} in [{low}, {high}], got {value!r}.", name)
    if not math.isfinite(value) or not low <= value <= high:
        raise _bad(f"'{name}' must be in [{low}, {high}], got {value!r}.", name)
    return value


def _temperature(body: dict, high: float) -> float:
    value = _number(body, "temperature", 1.0, 0.0, high)
    if 0 < value < MIN_TEMPERATURE:
        raise _bad(
            f"'temperature' must be 0 (greedy) or in [{MIN_TEMPERATURE}, {high}], got {value!r}: smaller "
            "values overflow the softmax; use 0 for greedy decoding.",
            "temperature",
        )
    return value


def _top_p(body: dict) -> float | None:
    value = _number(body, "top_p", None, 0.0, 1.0)
    if value is not None and value < MIN_TOP_P:
        raise _bad(
            f"'top_p' must be in [{MIN_TOP_P}, 1], got {value!r}: a smaller nucleus is just the most likely "
            "token (and underflows float32); use temperature 0 for greedy.",
            "top_p",
        )
    return None if value == 1 else value


def _prompt_ids(body: dict, served: ServedModel, limits: dict) -> list[int]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' is required and must be a non-empty string.", "prompt")
    if len(prompt) > limits["max_prompt_chars"]:
        raise _bad(
            f"'prompt' has {len(prompt)} characters; the limit is {limits['max_prompt_chars']}. Shorten it.",
            "prompt",
        )
    try:
        ids = served.encode(prompt)
    except ValueError as err:
        raise _bad(f"'prompt': {err}", "prompt") from None
    if not ids:
        raise _bad("'prompt' encodes to no tokens; send some text.", "prompt")
    if len(ids) > served.context_length:  # refused, not cut: the model would never see its start
        raise _bad(
            f"'prompt' is {len(ids)} tokens; this model has a context of {served.context_length} tokens. "
            "Shorten the prompt.",
            "prompt",
        )
    return ids


def parse_generate_request(raw: bytes, served: ServedModel, limits: dict) -> dict:
    """Validate a /generate body; return the generation arguments or raise RequestError (400)."""
    body = _json_object(raw)
    _check_fields(body, GENERATE_FIELDS)
    limit = limits["max_new_tokens"]  # the default never exceeds the server's limit
    return {
        "prompt_ids": _prompt_ids(body, served, limits),
        "max_new_tokens": _number(body, "max_new_tokens", min(100, limit), 1, limit, integer=True),
        "temperature": _temperature(body, 5.0),
        "top_k": _number(body, "top_k", None, 1, served.vocab_size, integer=True),
        "top_p": _top_p(body),
        "repetition_penalty": _number(body, "repetition_penalty", 1.0, 1.0, 5.0),
        "seed": _number(body, "seed", None, 0, 2**63 - 1, integer=True),
    }


def _stop_sequences(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise _bad(
            f"'stop' must be a non-empty string or a list of 1 to {MAX_STOP_SEQUENCES} non-empty strings, "
            f"got {stop!r}.",
            "stop",
        )
    longest = max(len(s) for s in stops)
    if longest > MAX_STOP_CHARS:
        raise _bad(
            f"a 'stop' string has {longest} characters; the limit is {MAX_STOP_CHARS} characters. "
            "Use shorter stop strings.",
            "stop",
        )
    return tuple(stops)


def _accept_neutral_fields(body: dict) -> dict:
    """The body without the unsupported OpenAI fields set to their neutral value; 400 for any other."""
    body = dict(body)
    for name, neutral in NEUTRAL_FIELDS.items():
        if name not in body:
            continue
        value = body.pop(name)
        if value != neutral or isinstance(value, bool) != isinstance(neutral, bool):  # False == 0
            raise _bad(
                f"'{name}' is not supported by this server; only its neutral value {json.dumps(neutral)} "
                f"is accepted, got {json.dumps(value)}. Remove it or send {json.dumps(neutral)}.",
                name,
            )
    user = body.pop("user", "")  # an end-user id for abuse tracking: accepted, not used
    if not isinstance(user, str):
        raise _bad(f"'user' must be a string, got {user!r}.", "user")
    return body


def parse_completion_request(raw: bytes, served: ServedModel, limits: dict) -> dict:
    """Validate a /v1/completions body (OpenAI's fields); raise RequestError (400 / 404)."""
    body = _json_object(raw)
    body = {key: value for key, value in body.items() if value is not None}  # null = the default
    body = _accept_neutral_fields(body)
    _check_fields(body, COMPLETION_FIELDS)
    limit = limits["max_new_tokens"]  # the default never exceeds the server's limit
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad(f"'model' is required: pass model={served.name!r} (see GET /v1/models).", "model")
    if model != served.name:
        raise RequestError(
            HTTPStatus.NOT_FOUND,
            f"model {model!r} is not served here; this server serves {served.name!r}.",
            "model",
            "model_not_found",
        )
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        raise _bad(f"'n' must be 1 (one completion per request), got {body['n']!r}.", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be true or false, got {stream!r}.", "stream")
    try:
        return_routing = check_return_routing(body.get("return_routing", False), served)
    except ValueError as err:
        raise _bad(str(err), "return_routing") from None
    return {
        "prompt_ids": _prompt_ids(body, served, limits),
        "max_new_tokens": _number(body, "max_tokens", min(16, limit), 1, limit, integer=True),  # OpenAI: 16
        "temperature": _temperature(body, 2.0),
        "top_p": _top_p(body),
        "seed": _number(body, "seed", None, 0, 2**63 - 1, integer=True),
        "stop": _stop_sequences(body),
        "stream": stream,
        "return_routing": return_routing,
    }


# ---------------------------------------------------------------------------------------------
# From token ids to text that is safe to send
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


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


class DeadlineReader(io.RawIOBase):
    """Reads from a socket; each read waits at most `idle_timeout`, and none past `deadline`."""

    def __init__(self, sock: socket.socket, idle_timeout: float):
        self.sock, self.idle_timeout = sock, idle_timeout
        self.deadline: float | None = None  # time.monotonic() by which the current request must be in

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        timeout = self.idle_timeout
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError("the request did not arrive within the read timeout")
        self.sock.settimeout(timeout)
        return self.sock.recv_into(buffer)


class GenerationHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked transfer encoding
    server: GenerationServer
    openai_errors = False  # /v1/... answers errors in OpenAI's shape

    def setup(self):
        self.timeout = self.server.read_timeout  # every read and write on this socket
        super().setup()
        self.rfile.close()  # replaced by a reader that also enforces a deadline for the whole request
        self._reader = DeadlineReader(self.connection, self.server.read_timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self):
        """Wait (idle, holding no slot) for a request, then read and answer it under deadlines: the
        request line and headers within header_timeout of its first byte, the body within read_timeout
        after the headers. A client that trickles bytes (slow loris) cannot hold its thread longer."""
        if not self._wait_for_request():
            self.close_connection = True
            return
        self._reader.deadline = time.monotonic() + self.server.header_timeout
        try:
            super().handle_one_request()
        except ClientGone:  # the client left before its answer: nothing to tell, nothing to log
            self.close_connection = True
        finally:
            self.server.release_slot(self)

    def _wait_for_request(self) -> bool:
        """Idle until the first byte of a request (at most read_timeout). An idle connection may be
        closed by the server to make room for a new one. False: closed, silent, or evicted."""
        self.server.mark_idle(self.connection)
        self._reader.deadline = time.monotonic() + self.server.read_timeout
        try:
            if not self.rfile.peek(1):
                return False
        except (TimeoutError, OSError):
            return False
        return self.server.mark_busy(self.connection)

    def parse_request(self) -> bool:
        """The request line and the headers are in (within header_timeout): the body gets read_timeout."""
        if not super().parse_request():
            return False
        self._reader.deadline = time.monotonic() + self.server.read_timeout
        return True

    def _request_arrived(self) -> None:
        """The request is read: no more deadline; writes get the full timeout."""
        self._reader.deadline = None
        self.connection.settimeout(self.server.read_timeout)

    def _client_gone(self) -> bool:
        """True once the client has closed its end: the socket reads as at its end (or was reset).
        Data waiting to be read (a pipelined next request) means the client is still there. A client
        that half-closes its sending side counts as gone: HTTP clients keep it open for the answer."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or already closed
            return True

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        if self.server.verbose:
            super().log_message(format, *args)

    # ----------------------------------------------------------------------- responses

    def _send_json(self, status: HTTPStatus, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            self.wfile.write(data)
        except OSError as err:  # the client left before its answer: nothing to tell, nothing to log
            raise ClientGone from err

    def _send_file(self, data: bytes, headers: dict[str, str]) -> None:
        self.send_response(HTTPStatus.OK)
        for name, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error_payload(self, status: int, message: str, param=None, code=None) -> dict:
        if self.openai_errors:
            kind = "invalid_request_error" if status < 500 else "server_error"
            return {"error": {"message": message, "type": kind, "param": param, "code": code}}
        return {"error": message, "status": int(status)}

    def _error(self, status: HTTPStatus, message: str, param=None, code=None) -> None:
        self._send_json(status, self._error_payload(status, message, param, code))

    def send_error(self, code, message=None, explain=None):
        """The standard library's own rejections (bad request line, headers too long, ...) as JSON."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        self.log_error("code %d, message %s", code, text)
        self._send_json(HTTPStatus(code), {"error": f"{text}. {explain or ''}".strip(), "status": int(code)})

    # ----------------------------------------------------------------------- routing

    def do_GET(self):
        self._request_arrived()
        self.openai_errors = self.path.startswith("/v1/")
        if self.path == "/health":
            self._send_json(HTTPStatus.OK, self.server.health())
        elif self.path == "/v1/models":
            model = {
                "id": self.server.served.name,
                "object": "model",
                "created": 0,
                "owned_by": "llm-foundation",
            }
            self._send_json(HTTPStatus.OK, {"object": "list", "data": [model]})
        elif self.path in ("/generate", "/v1/completions"):
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"use POST {self.path} with a JSON body.")
        elif (page := playground_file(self.path)) is not None:  # the playground page at /
            self._send_file(*page)
        else:
            self._error(
                HTTPStatus.NOT_FOUND,
                f"no endpoint {self.path!r}; use GET / (the playground page), GET /health, GET /v1/models, "
                "POST /v1/completions or POST /generate.",
            )

    def do_POST(self):
        self.openai_errors = self.path.startswith("/v1/")
        self._streaming = False  # True once a 200 event stream has begun: errors become events
        try:
            if self.path in ("/generate", "/v1/completions") and not self.server.take_slot(self):
                self._read_body()  # read first: closing on an unread body resets the connection
                self.close_connection = True
                raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, self.server.busy_message)
            if self.path == "/generate":
                self._generate(
                    parse_generate_request(self._read_body(), self.server.served, self.server.limits)
                )
            elif self.path == "/v1/completions":
                args = parse_completion_request(self._read_body(), self.server.served, self.server.limits)
                self._complete(args)
            elif self.path in ("/health", "/v1/models"):
                self.close_connection = True  # the body (if any) is not read
                self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"use GET {self.path}.")
            else:
                self.close_connection = True
                self._error(
                    HTTPStatus.NOT_FOUND,
                    f"no endpoint {self.path!r}; use POST /v1/completions or POST /generate.",
                )
        except RequestError as err:
            self._error(err.status, err.message, err.param, err.code)
        except ClientGone:
            self.close_connection = True
        except Exception as err:  # a bug or a model failure: answer 500 (or end the stream), keep serving
            self.close_connection = True
            self.log_error("%s", traceback.format_exc() if self.server.verbose else repr(err))
            if not self._streaming:
                message = f"internal error: {type(err).__name__}: {err}"
                try:
                    self._error(HTTPStatus.INTERNAL_SERVER_ERROR, message)
                except ClientGone:
                    pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length header.")
        length = self.headers.get("Content-Length")
        try:
            length = int(length)
        except (TypeError, ValueError):
            self.close_connection = True
            raise RequestError(
                HTTPStatus.LENGTH_REQUIRED, "a Content-Length header (a number) is required."
            ) from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}.",
            )
        chunks, received = [], 0
        try:
            while received < length:  # the reader raises TimeoutError past the request's deadline
                chunk = self.rfile.read1(length - received)
                if not chunk:
                    raise ClientGone
                chunks.append(chunk)
                received += len(chunk)
        except TimeoutError:
            self.close_connection = True
            raise RequestError(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the body announced {length} bytes but only {received} arrived within "
                f"{self.server.read_timeout} s; send the whole body at once, with a correct Content-Length.",
            ) from None
        self._request_arrived()
        return b"".join(chunks)

    # ----------------------------------------------------------------------- streaming

    def _start_stream(self) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streaming = True

    def _send_event(self, data: str) -> None:
        chunk = f"data: {data}\n\n".encode()
        try:
            self.wfile.write(f"{len(chunk):x}\r\n".encode("ascii") + chunk + b"\r\n")
            self.wfile.flush()
        except OSError as err:  # reset, broken pipe, or the client stopped reading (send timeout)
            raise ClientGone from err

    def _end_stream(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")  # the last chunk of the body
            self.wfile.flush()
        except OSError as err:
            raise ClientGone from err

    def _generate(self, args: dict) -> None:
        """POST /generate: one event per token, then a summary (or an error event)."""
        start = time.perf_counter()
        generation = Generation(self.server, args)
        try:
            self._start_stream()
            for piece, index in generation.pieces(self._client_gone):
                self._send_event(json.dumps({"token": piece, "index": index}))
        finally:
            generation.cancel()
        if generation.error is not None:
            self._send_event(json.dumps({"error": generation.error, "status": 500}))
        else:
            generation.assembler.flush()
            done = {
                "done": True,
                "generated_tokens": generation.n_tokens,
                "text": generation.assembler.text,
                "finish_reason": generation.finish_reason,
                "seconds": round(time.perf_counter() - start, 4),
            }
            self._send_event(json.dumps(done))
        self._end_stream()

    def _complete(self, args: dict) -> None:
        """POST /v1/completions, streamed (server-sent events) or as one JSON object."""
        base = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.server.served.name,
        }

        def chunk(text: str, finish_reason=None) -> dict:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
            if routing is not None:  # our extension: the experts of the tokens not reported yet
                return {**base, "choices": [choice], "routing": routing.new_entries(generation.assembler.ids)}
            return {**base, "choices": [choice]}

        generation = Generation(self.server, args, args["stop"])
        routing = None
        if args["return_routing"]:  # one chunk per token, even where it adds no text yet
            routing = RoutingReport(self.server.served, args["prompt_ids"], self.server.generation_lock)
        try:
            if args["stream"]:
                self._start_stream()
                for piece, _ in generation.pieces(self._client_gone):
                    if piece or routing is not None:
                        self._send_event(json.dumps(chunk(piece)))
            else:
                for _ in generation.pieces(self._client_gone):
                    pass
        finally:
            generation.cancel()
        finish, error, assembler = generation.finish_reason, generation.error, generation.assembler
        if args["stream"]:
            if error is not None:
                self._send_event(json.dumps(self._error_payload(500, error)))
            else:
                self._send_event(json.dumps(chunk(assembler.flush(), finish)))
            self._send_event("[DONE]")
            self._end_stream()
        elif error is not None:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, error)
        else:
            assembler.flush()
            n_prompt, n_new = len(args["prompt_ids"]), generation.n_tokens
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}
            self._send_json(HTTPStatus.OK, {**chunk(assembler.text, finish), "usage": usage})


class GenerationServer(ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` at once; one batching engine for all."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a burst of clients connecting at once is not dropped

    def __init__(
        self,
        address,
        served: ServedModel,
        limits: dict | None = None,
        verbose: bool = False,
        read_timeout: float = 10.0,
        max_connections: int = 32,
        max_batch_size: int = 16,
        generation_timeout: float = 300.0,
        kv_cache: bool = True,
        header_timeout: float | None = None,
        max_idle_connections: int | None = None,
    ):
        if not read_timeout > 0 or not generation_timeout > 0:
            raise ValueError(f"timeouts must be > 0 seconds, got {read_timeout} and {generation_timeout}.")
        if not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections must be a positive integer, got {max_connections!r}.")
        super().__init__(address, GenerationHandler)
        self.served = served
        self.limits = {**DEFAULT_LIMITS, **(limits or {})}
        self.verbose = verbose
        self.read_timeout = read_timeout
        # A real client sends its request line and headers in one packet: a fifth of the body's
        # deadline (2 s by default) is plenty for it and short for an attacker.
        self.header_timeout = read_timeout / 5 if header_timeout is None else header_timeout
        self.generation_timeout = generation_timeout
        self.max_connections = max_connections
        self.max_idle_connections = (
            4 * max_connections if max_idle_connections is None else max_idle_connections
        )
        if not 0 < self.header_timeout <= read_timeout or self.max_idle_connections < 1:
            raise ValueError(
                f"header_timeout must be in (0, read_timeout] and max_idle_connections >= 1, got "
                f"{self.header_timeout} and {self.max_idle_connections}."
            )
        self.busy_message = (
            f"the server is generating for its limit of {max_connections} requests at once "
            "(--max-connections); retry shortly."
        )
        self._slots = threading.BoundedSemaphore(max_connections)  # requests that generate at once
        self._slot_holders: set = set()  # handlers holding a slot
        self._open: set[socket.socket] = set()  # connections with a thread
        self._idle: dict[socket.socket, None] = {}  # those waiting for a request, oldest first
        self._connections_lock = threading.Lock()
        self._refusals: queue.Queue = queue.Queue(maxsize=64)
        threading.Thread(target=self._refuse_connections, name="refuser", daemon=True).start()
        # A model whose batch rows interact (MoE with an expert capacity) is served one request at a time.
        batch = max_batch_size if served.exact_batching else 1
        self.engine = BatchingEngine(served.next_token_step(kv_cache), max_batch_size=batch)
        self.generation_lock = self.engine.lock  # held during each forward step

    def health(self) -> dict:
        return {
            "status": "ok",
            "kind": self.served.kind,
            "name": self.served.name,
            "model": self.served.describe(),
            "vocab_size": self.served.vocab_size,
            "context_length": self.served.context_length,
            "limits": self.limits,
            "max_batch_size": self.engine.max_batch_size,
            "kv_cache": isinstance(self.engine.next_token_logits, KVCachedGPTStep),
            "max_connections": self.max_connections,
            "routing": describe_routing(self.served),  # None: no experts (see expert_routing.py)
        }

    # Connections and slots. A connection costs a thread; an idle one (no request line yet, or
    # between keep-alive requests) holds no slot and is closed, oldest first, to make room for a new
    # connection. A slot is taken only by a generation request whose headers have arrived, so idle
    # or trickling clients cannot lock out others, and GET /health never needs one.

    def process_request(self, request, client_address):
        """Start a thread for the connection (closing the oldest idle one if there are too many);
        answer 503 and close only when every connection is busy with a request."""
        with self._connections_lock:
            if len(self._open) >= self.max_connections + self.max_idle_connections:
                if not self._idle:
                    self._refuse(request)
                    return
                self._evict(next(iter(self._idle)))
            self._open.add(request)
            self._idle[request] = None
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request) -> None:
        with self._connections_lock:
            self._open.discard(request)
            self._idle.pop(request, None)

    def _evict(self, sock: socket.socket) -> None:
        """Close an idle connection (lock held): its thread's read ends at once and the thread exits."""
        self._open.discard(sock)
        self._idle.pop(sock, None)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @property
    def open_connections(self) -> int:
        with self._connections_lock:
            return len(self._open)

    @property
    def idle_connections(self) -> int:
        with self._connections_lock:
            return len(self._idle)

    def mark_idle(self, sock: socket.socket) -> None:
        with self._connections_lock:
            if sock in self._open:
                self._idle[sock] = None

    def mark_busy(self, sock: socket.socket) -> bool:
        """A request started on `sock`; False if the connection was evicted meanwhile."""
        with self._connections_lock:
            self._idle.pop(sock, None)
            return sock in self._open

    def take_slot(self, handler) -> bool:
        if not self._slots.acquire(blocking=False):
            return False
        self._slot_holders.add(handler)
        return True

    def release_slot(self, handler) -> None:
        if handler in self._slot_holders:
            self._slot_holders.discard(handler)
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """Hand the connection to the refuser thread (the accept loop must not wait on a client)."""
        try:
            self._refusals.put_nowait(request)
        except queue.Full:  # a flood: no answer at all
            self.shutdown_request(request)

    def _refuse_connections(self) -> None:
        """Answer 503, then read what the client sent until it hangs up (at most 1 s): closing with
        unread data would reset the connection and the client would never see the 503."""
        limit = self.max_connections + self.max_idle_connections
        message = f"the server has its limit of {limit} connections open, all busy; retry shortly."
        data = json.dumps({"error": message, "status": 503}).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        while (request := self._refusals.get()) is not None:
            try:
                request.settimeout(1.0)
                request.sendall(head.encode("ascii") + data)
                request.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline and request.recv(65536):
                    pass
            except OSError:
                pass
            finally:
                request.close()

    def server_close(self):
        super().server_close()
        self._refusals.put(None)
        self.engine.close()


def make_server(
    model, tokenizer=None, host: str = "127.0.0.1", port: int = 8000, *, name: str | None = None, **kwargs
) -> GenerationServer:
    """Create (not start) the server for a ServedModel, or a (model, tokenizer) pair.

    port 0 picks a free port (see server.server_address). kwargs: limits, verbose, read_timeout,
    max_connections, max_batch_size, generation_timeout, kv_cache (Phase 2 GPT: per-request KV
    caches; False = recompute each window, as for the MoE).
    """
    served = model if isinstance(model, ServedModel) else ServedModel.wrap(model, tokenizer, name)
    return GenerationServer((host, port), served, **kwargs)


def train_demo_checkpoint(path, steps: int = 200) -> None:
    """Train a small character GPT on the offline story corpus (~30 s on a CPU) and save it to `path`."""
    from phase5_production.src.demo_models import story_corpus, train_char_gpt

    corpus = story_corpus()
    model = train_char_gpt(corpus, steps=steps)
    save_served_checkpoint(path, model, corpus.tokenizer, step=steps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint",
        default="phase5_demo_gpt.pt",
        help="a Phase 2 checkpoint (save_served_checkpoint / --demo), or a checkpoint file or run folder "
        "that a registered loader serves (a Sparse MoE run: runs/cpu-demo)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="first train a small demo model (~30 s on a CPU) and save it at --checkpoint",
    )
    parser.add_argument("--demo-steps", type=int, default=200)
    parser.add_argument(
        "--model-name", help="the name clients pass as 'model' (default: the checkpoint's name)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-prompt-chars", type=int, default=DEFAULT_LIMITS["max_prompt_chars"])
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_LIMITS["max_new_tokens"])
    parser.add_argument("--read-timeout", type=float, default=10.0, help="seconds a client may stay silent")
    parser.add_argument("--max-connections", type=int, default=32, help="connections served at once")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests per forward pass (1 = off)")
    args = parser.parse_args(argv)
    try:
        if args.demo:
            print(f"training a demo model for {args.demo_steps} steps ...")
            train_demo_checkpoint(args.checkpoint, steps=args.demo_steps)
            print(f"saved {args.checkpoint}")
        served = load_served_model(args.checkpoint, name=args.model_name)
        limits = {"max_prompt_chars": args.max_prompt_chars, "max_new_tokens": args.max_new_tokens}
        server = make_server(
            served,
            host=args.host,
            port=args.port,
            limits=limits,
            verbose=True,
            read_timeout=args.read_timeout,
            max_connections=args.max_connections,
            max_batch_size=args.max_batch_size,
        )
    except (FileNotFoundError, ValueError, TypeError, OSError, ImportError) as err:  # one line, no traceback
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    host, port = server.server_address[:2]
    print(
        f"serving {served.kind} model {served.name!r} on http://{host}:{port} "
        "(GET /health, POST /v1/completions, POST /generate); Ctrl-C to stop\n"
        f"open http://{host}:{port}/ in a browser for the playground page"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
