"""A small HTTP server that streams tokens from a Phase 2 GPT checkpoint (standard library only).

    python phase5_production/src/server.py --demo --checkpoint /tmp/demo_gpt.pt   # train ~30 s, then serve
    python phase5_production/src/server.py --checkpoint /tmp/demo_gpt.pt          # serve a checkpoint
    curl -N -X POST http://127.0.0.1:8000/generate -d '{"prompt": "Once upon", "max_new_tokens": 50}'
    curl http://127.0.0.1:8000/health

Endpoints
    GET  /health     200 {"status": "ok", "model": {...config...}, "vocab_size": V}
    POST /generate   JSON body {"prompt": str, "max_new_tokens": int, "temperature": float,
                     "top_k": int|null, "top_p": float|null, "repetition_penalty": float, "seed": int|null}
                     -> 200 text/event-stream, sent with chunked transfer encoding: one event per token
                        data: {"token": "a", "index": 0}
                        ...
                        data: {"done": true, "generated_tokens": n, "text": "..."}
Every bad request gets a 4xx JSON error {"error": "..."} naming the problem and the fix: not JSON,
not an object, unknown fields, missing/empty/too long prompt, characters the tokenizer does not
know, parameters out of range (400); body too large (413); unknown path (404); wrong method (405).

A checkpoint is written by Phase 2's `save_checkpoint` with two extras: "config"
(dataclasses.asdict(GPTConfig)) and "tokenizer_chars" (the CharTokenizer's alphabet); see
`save_served_checkpoint`. The server binds to 127.0.0.1 unless told otherwise (--host).
Generation uses the KV cache and Phase 5 sampling; one request generates at a time (a lock),
while /health keeps answering.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase2_architecture.src.training_utils import load_checkpoint, save_checkpoint
from phase3_components.src.char_tokenizer import CharTokenizer
from phase5_production.src.kv_cache import stream_with_cache

MAX_BODY_BYTES = 64 * 1024
DEFAULT_LIMITS = {"max_prompt_chars": 2000, "max_new_tokens": 500}
FIELDS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


class RequestError(Exception):
    """A client error: HTTP status + a message that names the problem and the fix."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


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
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path!r} is not a readable checkpoint: {err}") from err
    if not isinstance(meta, dict) or "config" not in meta or "tokenizer_chars" not in meta:
        raise ValueError(
            f"{path!r} lacks 'config' or 'tokenizer_chars'; write it with save_served_checkpoint "
            "(or `server.py --demo`)."
        )
    model = GPT(GPTConfig(**meta["config"]))
    load_checkpoint(path, model)  # validates the weights against the model
    tokenizer = CharTokenizer(meta["tokenizer_chars"])
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} characters but the model's vocab_size is "
            f"{model.config.vocab_size}; the checkpoint is inconsistent."
        )
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# Request validation
# ---------------------------------------------------------------------------------------------


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None and default is None:
        return None
    kind = "an integer" if integer else "a number"
    wrong_type = not isinstance(value, int if integer else (int, float)) or isinstance(value, bool)
    if wrong_type:
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"'{name}' must be {kind} in [{low}, {high}], got {value!r}."
        )
    if not math.isfinite(value) or not low <= value <= high:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'{name}' must be in [{low}, {high}], got {value!r}.")
    return value


def parse_generate_request(raw: bytes, tokenizer: CharTokenizer, vocab_size: int, limits: dict) -> dict:
    """Validate a /generate body; return the generation arguments or raise RequestError (400)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"the body is not valid UTF-8 JSON ({err}); send a JSON object."
        ) from None
    if not isinstance(body, dict):
        raise RequestError(
            HTTPStatus.BAD_REQUEST, 'the body must be a JSON object such as {"prompt": "Once"}.'
        )
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"unknown field(s) {unknown}; allowed fields: {list(FIELDS)}."
        )
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(HTTPStatus.BAD_REQUEST, "'prompt' is required and must be a non-empty string.")
    if len(prompt) > limits["max_prompt_chars"]:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"'prompt' has {len(prompt)} characters; the limit is {limits['max_prompt_chars']}. Shorten it.",
        )
    unknown_chars = sorted({ch for ch in prompt if ch not in tokenizer.stoi})
    if unknown_chars:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"'prompt' contains characters the model's tokenizer does not know: {unknown_chars[:10]}; "
            f"use only these characters: {''.join(tokenizer.itos)!r}.",
        )
    args = {
        "prompt": prompt,
        "max_new_tokens": _number(body, "max_new_tokens", 100, 1, limits["max_new_tokens"], integer=True),
        "temperature": _number(body, "temperature", 1.0, 0.0, 5.0),
        "top_k": _number(body, "top_k", None, 1, vocab_size, integer=True),
        "top_p": _number(body, "top_p", None, 0.0, 1.0),
        "repetition_penalty": _number(body, "repetition_penalty", 1.0, 1.0, 5.0),
        "seed": _number(body, "seed", None, 0, 2**63 - 1, integer=True),
    }
    if args["top_p"] is not None and args["top_p"] == 0:
        raise RequestError(HTTPStatus.BAD_REQUEST, "'top_p' must be in (0, 1]; use temperature 0 for greedy.")
    return args


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


class GenerationHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # needed for chunked transfer encoding
    server: GenerationServer

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        if self.server.verbose:
            super().log_message(format, *args)

    def _send_json(self, status: HTTPStatus, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._send_json(status, {"error": message, "status": int(status)})

    def do_GET(self):
        if self.path == "/health":
            self._send_json(
                HTTPStatus.OK,
                {
                    "status": "ok",
                    "model": dataclasses.asdict(self.server.model.config),
                    "vocab_size": self.server.tokenizer.vocab_size,
                    "limits": self.server.limits,
                },
            )
        elif self.path == "/generate":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "use POST /generate with a JSON body.")
        else:
            self._error(
                HTTPStatus.NOT_FOUND, f"no endpoint {self.path!r}; use GET /health or POST /generate."
            )

    def do_POST(self):
        if self.path != "/generate":
            if self.path == "/health":
                self._error(HTTPStatus.METHOD_NOT_ALLOWED, "use GET /health.")
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no endpoint {self.path!r}; use POST /generate.")
            return
        try:
            args = parse_generate_request(
                self._read_body(),
                self.server.tokenizer,
                self.server.model.config.vocab_size,
                self.server.limits,
            )
        except RequestError as err:
            self._error(err.status, err.message)
            return
        self._stream(args)

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
        return self.rfile.read(length)

    def _write_chunk(self, text: str) -> None:
        data = text.encode("utf-8")
        self.wfile.write(f"{len(data):x}\r\n".encode("ascii") + data + b"\r\n")
        self.wfile.flush()

    def _stream(self, args: dict) -> None:
        """Server-sent events, one per token, in HTTP/1.1 chunks."""
        tokenizer, model = self.server.tokenizer, self.server.model
        idx = torch.tensor([tokenizer.encode(args["prompt"])], dtype=torch.long)  # [1, T]
        generator = None
        if args["seed"] is not None:
            generator = torch.Generator().manual_seed(args["seed"])
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        pieces = []
        start = time.perf_counter()
        try:
            with self.server.generation_lock:
                stream = stream_with_cache(
                    model,
                    idx,
                    args["max_new_tokens"],
                    temperature=args["temperature"],
                    top_k=args["top_k"],
                    top_p=args["top_p"],
                    repetition_penalty=args["repetition_penalty"],
                    generator=generator,
                )
                for i, token in enumerate(stream):
                    piece = tokenizer.decode([int(token[0])])
                    pieces.append(piece)
                    self._write_chunk(f"data: {json.dumps({'token': piece, 'index': i})}\n\n")
            done = {
                "done": True,
                "generated_tokens": len(pieces),
                "text": "".join(pieces),
                "seconds": round(time.perf_counter() - start, 4),
            }
            self._write_chunk(f"data: {json.dumps(done)}\n\n")
            self.wfile.write(b"0\r\n\r\n")  # end of the chunked body
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; stop generating


class GenerationServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address, model: GPT, tokenizer: CharTokenizer, limits: dict | None = None, verbose: bool = False
    ):
        super().__init__(address, GenerationHandler)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.limits = {**DEFAULT_LIMITS, **(limits or {})}
        self.verbose = verbose
        self.generation_lock = threading.Lock()


def make_server(
    model: GPT, tokenizer: CharTokenizer, host: str = "127.0.0.1", port: int = 8000, **kwargs
) -> GenerationServer:
    """Create (not start) the server; port 0 picks a free port (see server.server_address)."""
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"tokenizer vocab ({tokenizer.vocab_size}) does not match the model's vocab_size "
            f"({model.config.vocab_size})."
        )
    return GenerationServer((host, port), model, tokenizer, **kwargs)


def train_demo_checkpoint(path, steps: int = 200) -> None:
    """Train a small character GPT on the offline story corpus (~30 s on a CPU) and save it to `path`."""
    from phase5_production.src.demo_models import story_corpus, train_char_gpt

    corpus = story_corpus()
    model = train_char_gpt(corpus, steps=steps)
    save_served_checkpoint(path, model, corpus.tokenizer, step=steps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="phase5_demo_gpt.pt", help="checkpoint to serve")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="first train a small demo model (~30 s on a CPU) and save it at --checkpoint",
    )
    parser.add_argument("--demo-steps", type=int, default=200)
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-prompt-chars", type=int, default=DEFAULT_LIMITS["max_prompt_chars"])
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_LIMITS["max_new_tokens"])
    args = parser.parse_args(argv)
    if args.demo:
        print(f"training a demo model for {args.demo_steps} steps ...")
        train_demo_checkpoint(args.checkpoint, steps=args.demo_steps)
        print(f"saved {args.checkpoint}")
    model, tokenizer = load_served_checkpoint(args.checkpoint)
    limits = {"max_prompt_chars": args.max_prompt_chars, "max_new_tokens": args.max_new_tokens}
    server = make_server(model, tokenizer, args.host, args.port, limits=limits, verbose=True)
    host, port = server.server_address[:2]
    print(f"serving {args.checkpoint} on http://{host}:{port}  (GET /health, POST /generate); Ctrl-C to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
