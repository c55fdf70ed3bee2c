"""An HTTP server for language-model checkpoints: OpenAI-compatible, batched, hardened.

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

What it serves: a Phase 2 checkpoint, or any checkpoint a registered loader claims (served_models.py;
the Sparse MoE registers its own through an entry point). The server is built from one module per concept:

    request_parsing.py     a request body -> validated generation arguments, or a RequestError
    text_streaming.py      generated token ids -> text pieces safe to send (whole characters, stop strings)
    connection_limits.py   deadlines, body size, connections and generation slots
    request_handler.py     routing and answers: JSON, or server-sent events
    server.py              the server (one batching engine for all requests), make_server, the command line
"""

from __future__ import annotations

import argparse
import sys

from phase5_production.src.batching import BatchingEngine, KVCachedGPTStep
from phase5_production.src.connection_limits import LimitedConnectionsServer
from phase5_production.src.expert_routing import describe_routing
from phase5_production.src.request_handler import GenerationHandler
from phase5_production.src.request_parsing import DEFAULT_LIMITS
from phase5_production.src.served_models import ServedModel, load_served_model, save_served_checkpoint


class GenerationServer(LimitedConnectionsServer):
    """The connection limits of LimitedConnectionsServer, and one batching engine for every request."""

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
        super().__init__(
            address, GenerationHandler, read_timeout, max_connections, header_timeout, max_idle_connections
        )
        self.served = served
        self.limits = {**DEFAULT_LIMITS, **(limits or {})}
        self.verbose = verbose
        self.generation_timeout = generation_timeout
        # A model whose batch rows interact (an expert capacity) is served one request at a time.
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

    def server_close(self):
        super().server_close()
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
