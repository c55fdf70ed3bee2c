"""Server throughput for 1, 4 and 16 concurrent clients, with batching on and off.

    python phase5_production/benchmarks/bench_server.py --threads 1
    python phase5_production/benchmarks/bench_server.py --threads 1 --no-kv-cache   # the MoE's padded path

Two servers run on 127.0.0.1 with the same model: one batches the requests in flight into one
forward pass per step (max_batch_size 16), the other serves one request at a time
(max_batch_size 1). For each number of clients, that many threads of a separate client process
each send --requests non-streamed POST /v1/completions (greedy, --max-tokens each) on one
kept-alive connection over a real socket; throughput is the generated tokens divided by the wall
time until the last answer. After a warm-up, the two servers are measured alternately, --repeats
times, and the medians compared (the ratio is what carries over to another machine). Every answer
is checked: with greedy decoding a request gets the same text from both servers. Weights are
random: the time of a forward pass does not depend on their values.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?'\n"


def complete(conn: http.client.HTTPConnection, body: dict) -> dict:
    """One non-streamed completion on a kept-alive connection."""
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    payload = json.loads(response.read())
    if response.status != 200:
        raise RuntimeError(f"the server answered {response.status}: {payload}")
    return payload


def run_clients(address, n_clients: int, requests: int, max_tokens: int) -> tuple[float, dict[str, str]]:
    """n_clients threads, each sending `requests` completions one after another: (tokens / s, texts)."""
    texts: dict[str, str] = {}
    tokens = [0] * n_clients
    errors: list[BaseException] = []

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(*address, timeout=300)  # one kept-alive connection per client
        try:
            for r in range(requests):
                prompt = ALPHABET[(3 * i + r) % 26] + " story about " + ALPHABET[(5 * i + r) % 26]
                body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
                payload = complete(conn, body)
                texts[prompt] = payload["choices"][0]["text"]
                tokens[i] += payload["usage"]["completion_tokens"]
        except BaseException as err:  # reported by the main thread
            errors.append(err)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return sum(tokens) / seconds, texts


def client_main(argv: list[str]) -> None:
    """`bench_server.py --client HOST PORT CLIENTS REQUESTS MAX_TOKENS`: print {"tokens_per_s", "texts"}."""
    host, port, n_clients, requests, max_tokens = argv
    tokens_per_s, texts = run_clients((host, int(port)), int(n_clients), int(requests), int(max_tokens))
    print(json.dumps({"tokens_per_s": tokens_per_s, "texts": texts}))


def measure(server, n_clients: int, requests: int, max_tokens: int) -> tuple[float, dict[str, str]]:
    """Run the clients in another process: in the server's own process their threads would compete
    with the server's threads for the interpreter lock and distort the comparison."""
    host, port = server.server_address[:2]
    argv = [
        sys.executable,
        __file__,
        "--client",
        host,
        str(port),
        str(n_clients),
        str(requests),
        str(max_tokens),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the client process failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout)
    return result["tokens_per_s"], result["texts"]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=2, help="completions per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per setting (median)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument(
        "--no-kv-cache",
        action="store_true",
        help="batch right-padded windows without a cache (the MoE's path) instead of per-request KV caches",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    import torch  # here, not at the top: the client processes need only the standard library

    from phase2_architecture.src.gpt import GPT, GPTConfig
    from phase3_components.src.char_tokenizer import CharTokenizer
    from phase5_production.src.server import make_server

    if min(args.clients) < 1 or args.requests < 1 or args.max_tokens < 1 or args.repeats < 1:
        parser.error("--clients, --requests, --max-tokens and --repeats must be positive")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = CharTokenizer(ALPHABET)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=4,
        d_model=args.d_model,
    )  # fmt: skip
    model = GPT(config).eval()
    with torch.no_grad():  # peaked predictions, so that greedy answers have no near-ties to compare
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    limits = {"max_new_tokens": args.max_tokens}
    connections = max(args.clients) + 4
    servers = {
        "batched": make_server(
            model, tokenizer, port=0, name="bench", limits=limits, max_connections=connections
        ),
        "one at a time": make_server(
            model,
            tokenizer,
            port=0,
            name="bench",
            limits=limits,
            max_connections=connections,
            max_batch_size=1,
        ),
    }
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers.values()]
    for t in threads:
        t.start()
    print(
        f"GPT d_model={config.d_model} n_layer={config.n_layer} block_size={config.block_size} "
        f"(random weights), {'no cache, padded windows' if args.no_kv_cache else 'per-request KV caches'}, "
        f"{args.requests} requests x {args.max_tokens} tokens per client, greedy, torch threads "
        f"{torch.get_num_threads()}, median of {args.repeats} alternating runs"
    )
    print(f"{'clients':>7} {'batched tok/s':>14} {'one-at-a-time tok/s':>20} {'ratio':>6}")
    rows = []
    try:
        for server in servers.values():  # warm up: the first forward passes allocate and initialise
            measure(server, 2, 1, args.max_tokens)
        for n in args.clients:
            speeds: dict[str, list[float]] = {name: [] for name in servers}
            answers: dict[str, dict[str, str]] = {}
            for _ in range(args.repeats):
                for name, server in servers.items():  # alternate the contenders
                    tokens_per_s, texts = measure(server, n, args.requests, args.max_tokens)
                    speeds[name].append(tokens_per_s)
                    answers[name] = texts
            if answers["batched"] != answers["one at a time"]:
                raise AssertionError("batched and one-at-a-time servers answered differently")
            on, off = (statistics.median(speeds[name]) for name in servers)
            rows.append({"clients": n, "batched_tok_s": on, "serial_tok_s": off, "ratio": on / off})
            print(f"{n:>7} {on:>14.0f} {off:>20.0f} {on / off:>5.1f}x")
    finally:
        for server in servers.values():
            server.shutdown()
            server.server_close()
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        client_main(sys.argv[2:])
    else:
        main()
