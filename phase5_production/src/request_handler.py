"""The request handler: routes each request to its endpoint and writes the answer (JSON, or a stream
of server-sent events over chunked transfer encoding).

    GET  /, /health, /v1/models         the playground page, the server's state, the served model
    POST /generate                      one event per token, then a summary
    POST /v1/completions                OpenAI's completions, streamed or as one JSON object

Requests are read under the deadlines of `DeadlineRequestHandler` (connection_limits.py), parsed by
request_parsing.py and generated through text_streaming.py's `Generation`. A client error is a 4xx JSON
error; a failure after a stream has begun ends the stream with an error event.
"""

from __future__ import annotations

import json
import time
import traceback
import uuid
from http import HTTPStatus
from typing import TYPE_CHECKING

from phase5_production.src.connection_limits import DeadlineRequestHandler
from phase5_production.src.expert_routing import RoutingReport
from phase5_production.src.playground_page import playground_file
from phase5_production.src.request_parsing import (
    RequestError,
    parse_completion_request,
    parse_generate_request,
)
from phase5_production.src.text_streaming import ClientGone, Generation

if TYPE_CHECKING:
    from phase5_production.src.server import GenerationServer


class GenerationHandler(DeadlineRequestHandler):
    """Routes a request that arrived within the limits to its endpoint, and writes the answer."""

    server: GenerationServer
    openai_errors = False  # /v1/... answers errors in OpenAI's shape

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
