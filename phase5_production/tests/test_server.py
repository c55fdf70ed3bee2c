"""The streaming HTTP server, end to end over a real socket on 127.0.0.1."""

import http.client
import json
import select
import socket
import threading
import time

import pytest
import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase3_components.src.char_tokenizer import CharTokenizer
from phase5_production.src.kv_cache import generate_with_cache
from phase5_production.src.server import (
    MAX_BODY_BYTES,
    load_served_checkpoint,
    make_server,
    save_served_checkpoint,
)
from phase5_production.src.server import (
    main as server_main,
)

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"


def _model_and_tokenizer():
    tokenizer = CharTokenizer(ALPHABET)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, d_model=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)  # peaked predictions: greedy output has no near-ties
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Save a checkpoint, load it like `server.py --checkpoint` does, serve it on a free port."""
    model, tokenizer = _model_and_tokenizer()
    path = tmp_path_factory.mktemp("ckpt") / "gpt.pt"
    save_served_checkpoint(path, model, tokenizer)
    loaded_model, loaded_tokenizer = load_served_checkpoint(path)
    server = make_server(loaded_model, loaded_tokenizer, port=0, limits={"max_prompt_chars": 50})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, loaded_model, loaded_tokenizer
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    assert not thread.is_alive()


def _connection(server):
    host, port = server.server_address[:2]
    return http.client.HTTPConnection(host, port, timeout=30)


def _post(server, body, path="/generate", raw=None, headers=None):
    conn = _connection(server)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


def _events(response):
    """Read server-sent events line by line as they arrive."""
    events = []
    while True:
        line = response.readline()
        if not line:
            return events
        if line.startswith(b"data: "):
            events.append(json.loads(line[len(b"data: ") :]))


def test_binds_to_localhost_by_default(served):
    server, _, _ = served
    assert server.server_address[0] == "127.0.0.1"


def test_health(served):
    server, model, _ = served
    conn = _connection(server)
    conn.request("GET", "/health")
    response = conn.getresponse()
    payload = json.loads(response.read())
    assert response.status == 200
    assert payload["status"] == "ok" and payload["vocab_size"] == len(ALPHABET)
    assert payload["model"]["block_size"] == model.config.block_size
    conn.close()


def test_generate_streams_tokens_equal_to_greedy_generation(served):
    server, model, tokenizer = served
    conn, response = _post(server, {"prompt": "the cat", "max_new_tokens": 40, "temperature": 0})
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    assert response.getheader("Transfer-Encoding") == "chunked"
    events = _events(response)
    conn.close()
    tokens, done = events[:-1], events[-1]
    assert [e["index"] for e in tokens] == list(range(40))
    assert done["done"] is True and done["generated_tokens"] == 40
    text = "".join(e["token"] for e in tokens)
    assert done["text"] == text
    # 7 + 40 tokens > block_size 32: the served stream also covers the sliding window
    idx = torch.tensor([tokenizer.encode("the cat")])
    expected = generate_with_cache(model, idx, 40, temperature=0)[0, 7:].tolist()
    assert text == tokenizer.decode(expected)


def test_seeded_sampling_is_reproducible(served):
    server, _, _ = served
    body = {"prompt": "a", "max_new_tokens": 15, "temperature": 1.0, "top_k": 5, "top_p": 0.9, "seed": 3}
    texts = []
    for _ in range(2):
        conn, response = _post(server, body)
        texts.append(_events(response)[-1]["text"])
        conn.close()
    assert texts[0] == texts[1] and len(texts[0]) == 15


BAD_REQUESTS = [
    ({"max_new_tokens": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 12}, "prompt"),
    ({"prompt": "a" * 51}, "limit is 50"),
    ({"prompt": "Hello!"}, "does not know"),
    ({"prompt": "a", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": 10_000}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": "5"}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": 2.5}, "max_new_tokens"),
    ({"prompt": "a", "temperature": -1}, "temperature"),
    ({"prompt": "a", "temperature": True}, "temperature"),
    ({"prompt": "a", "top_k": 0}, "top_k"),
    ({"prompt": "a", "top_k": 1000}, "top_k"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1e-320}, "top_p"),  # found by fuzzing: float32 underflow, empty nucleus
    ({"prompt": "a", "repetition_penalty": 0.5}, "repetition_penalty"),
    ({"prompt": "a", "stream": True}, "unknown field"),
]


@pytest.mark.parametrize("body,fragment", BAD_REQUESTS)
def test_bad_requests_get_400_with_a_clear_message(served, body, fragment):
    server, _, _ = served
    conn, response = _post(server, body)
    payload = json.loads(response.read())
    conn.close()
    assert response.status == 400
    assert response.getheader("Content-Type") == "application/json"
    assert fragment in payload["error"]


@pytest.mark.parametrize(
    "raw,fragment",
    [
        (b"{not json", "not valid"),
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe", "not valid"),
        (b"NaN", "JSON object"),
    ],
)
def test_malformed_bodies_get_400(served, raw, fragment):
    server, _, _ = served
    conn, response = _post(server, None, raw=raw)
    payload = json.loads(response.read())
    conn.close()
    assert response.status == 400 and fragment in payload["error"]


def test_nan_temperature_is_rejected(served):
    server, _, _ = served
    conn, response = _post(server, None, raw=b'{"prompt": "a", "temperature": NaN}')
    assert response.status == 400 and "temperature" in json.loads(response.read())["error"]
    conn.close()


def test_wrong_path_method_and_size(served):
    server, _, _ = served
    conn, response = _post(server, {"prompt": "a"}, path="/nope")
    assert response.status == 404 and "endpoint" in json.loads(response.read())["error"]
    conn.close()
    conn = _connection(server)
    conn.request("GET", "/generate")
    response = conn.getresponse()
    assert response.status == 405
    response.read()
    conn.close()
    conn, response = _post(server, None, raw=b"x" * (MAX_BODY_BYTES + 1))
    assert response.status == 413 and "limit" in json.loads(response.read())["error"]
    conn.close()


def test_server_is_still_healthy_after_bad_requests(served):
    server, _, _ = served
    for body in (b"{", b"[]", b'{"prompt": "\\u00e9"}'):
        conn, response = _post(server, None, raw=body)
        response.read()
        conn.close()
    conn = _connection(server)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


def test_checkpoint_round_trip_and_errors(tmp_path):
    model, tokenizer = _model_and_tokenizer()
    path = tmp_path / "served.pt"
    save_served_checkpoint(path, model, tokenizer)
    loaded, loaded_tok = load_served_checkpoint(path)
    idx = torch.tensor([tokenizer.encode("hello")])
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert loaded_tok.itos == tokenizer.itos
    with pytest.raises(FileNotFoundError, match="--demo"):
        load_served_checkpoint(tmp_path / "missing.pt")
    torch.save({"model": model.state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="tokenizer_chars"):
        load_served_checkpoint(tmp_path / "bare.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_served_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="vocab"):
        make_server(model, CharTokenizer("abc"), port=0)


def test_missing_content_length_gets_411(served):
    server, _, _ = served
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\r\n")
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 411") and "Content-Length" in reply


def test_health_answers_while_a_generation_waits_for_the_model(served):
    """Generation is serialised by a lock; /health does not take it."""
    server, _, _ = served
    result = {}

    def generate():
        conn, response = _post(server, {"prompt": "ab", "max_new_tokens": 3, "temperature": 0})
        result["events"] = _events(response)
        conn.close()

    with server.generation_lock:  # hold the model: the request below must wait
        worker = threading.Thread(target=generate)
        worker.start()
        conn = _connection(server)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        assert "events" not in result
    worker.join(timeout=30)
    assert result["events"][-1]["generated_tokens"] == 3


# ---------------------------------------------------------------------------------------------
# Hardening: timeouts, a bound on connections, a 4xx JSON for every bad body, errors mid-stream,
# start-up errors. Each probe hung, crashed or answered 200 before the fix.
# ---------------------------------------------------------------------------------------------


def _start(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def _stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def strict_server():
    """A fresh server with a short read timeout and room for 4 connections."""
    model, tokenizer = _model_and_tokenizer()
    server = make_server(model, tokenizer, port=0, read_timeout=0.5, max_connections=4)
    thread = _start(server)
    yield server
    _stop(server, thread)


def _raw_exchange(server, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, return everything the server answers until it closes (or `timeout`)."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def _json_reply(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_body_shorter_than_its_content_length_gets_408_after_the_read_timeout(strict_server):
    start = time.monotonic()
    request = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b'{"prompt": "abcd",'
    status, payload = _json_reply(_raw_exchange(strict_server, request))
    assert status == 408 and "only 18 arrived" in payload["error"]
    assert time.monotonic() - start < 5  # read_timeout 0.5 s, not forever


def test_a_silent_connection_is_closed_after_the_read_timeout(strict_server):
    start = time.monotonic()
    with socket.create_connection(strict_server.server_address[:2], timeout=10) as sock:
        assert sock.recv(1024) == b""  # the server hung up
    assert time.monotonic() - start < 5


def test_slow_loris_connections_hold_no_slot_and_are_dropped_at_the_header_deadline():
    """4 connections (= max_connections) that trickle their headers hold no slot: /health and a
    generation are served meanwhile; each loris is dropped at the header deadline (2 s)."""
    model, tokenizer = _model_and_tokenizer()
    server = make_server(model, tokenizer, port=0, read_timeout=10, header_timeout=2, max_connections=4)
    thread = _start(server)
    lorises = [socket.create_connection(server.server_address[:2], timeout=10) for _ in range(4)]
    try:
        for sock in lorises:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        conn = _connection(server)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        conn, response = _post(server, {"prompt": "ab", "max_new_tokens": 2, "temperature": 0})
        assert response.status == 200 and _events(response)[-1]["generated_tokens"] == 2
        conn.close()
        for sock in lorises:
            assert sock.recv(1024) == b""  # dropped at the header deadline, within the socket's 10 s
    finally:
        for sock in lorises:
            sock.close()
        _stop(server, thread)


def test_when_every_connection_is_busy_the_next_gets_503_at_once():
    """With room for 2 connections (1 slot + 1 idle) held by 2 clients mid-request (not idle, so
    not evictable), the 3rd gets a 503 JSON at once; a client that sends a request reads it (not a
    reset). Once the two are dropped at the header deadline, the server answers again."""
    model, tokenizer = _model_and_tokenizer()
    server = make_server(
        model, tokenizer, port=0, read_timeout=10, header_timeout=2, max_connections=1, max_idle_connections=1
    )
    thread = _start(server)
    address = server.server_address[:2]
    lorises = [socket.create_connection(address, timeout=10) for _ in range(2)]
    try:
        for sock in lorises:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + 10  # until both threads have seen their request line
        while (server.idle_connections or server.open_connections < 2) and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.create_connection(address, timeout=10) as extra:
            reply = b""
            while chunk := extra.recv(65536):
                reply += chunk
        status, payload = _json_reply(reply)
        assert status == 503 and "limit of 2 connections open, all busy" in payload["error"]
        conn, response = _post(server, {"prompt": "ab" * 500})
        assert response.status == 503 and "retry" in json.loads(response.read())["error"]
        conn.close()
        for sock in lorises:
            assert sock.recv(1024) == b""  # dropped at the header deadline
    finally:
        for sock in lorises:
            sock.close()
    conn = _connection(server)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    _stop(server, thread)


def test_a_client_that_trickles_its_headers_is_dropped_after_the_read_timeout(strict_server):
    """Slow loris: one header byte every 0.1 s keeps each read under the idle timeout, but the whole
    request must arrive within read_timeout (0.5 s)."""
    start = time.monotonic()
    with socket.create_connection(strict_server.server_address[:2], timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\n")
        closed = False
        while not closed and time.monotonic() - start < 5:
            try:
                sock.sendall(b"X")
                time.sleep(0.1)
                ready, _, _ = select.select([sock], [], [], 0)
                closed = bool(ready) and sock.recv(1024) == b""
            except OSError:  # reset by the server
                closed = True
    assert closed and time.monotonic() - start < 3


@pytest.mark.parametrize(
    "raw,fragment",
    [
        (b'{"prompt": "a", "temperature": 1e-40}', "temperature"),
        (b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", "smaller numbers"),
        (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
    ],
    ids=["tiny-temperature", "5000-digit-integer", "30000-deep-nesting"],
)
def test_pathological_bodies_get_400_json_not_a_dropped_connection(served, raw, fragment):
    server, _, _ = served
    conn, response = _post(server, None, raw=raw)
    assert response.status == 400 and response.getheader("Content-Type") == "application/json"
    assert fragment in json.loads(response.read())["error"]
    conn.close()


def test_the_standard_librarys_own_rejections_are_json(served):
    server, _, _ = served
    request = b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n"
    status, payload = _json_reply(_raw_exchange(server, request))
    assert status == 431 and "Line too long" in payload["error"]


@pytest.fixture
def nan_server():
    """A model whose logits are NaN: sampling fails after the stream has started."""
    model, tokenizer = _model_and_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    server = make_server(model, tokenizer, port=0, name="nan")
    thread = _start(server)
    yield server
    _stop(server, thread)


def test_a_failure_while_streaming_ends_with_an_error_event_and_a_clean_end(nan_server):
    conn, response = _post(nan_server, {"prompt": "ab", "max_new_tokens": 5, "temperature": 1.0})
    assert response.status == 200
    events = _events(response)  # reads to the end of the chunked body: no IncompleteRead
    conn.close()
    assert "sampling failed" in events[-1]["error"] and events[-1]["status"] == 500
    conn, response = _post(nan_server, {"prompt": "ab", "max_new_tokens": 5, "temperature": 0})
    assert _events(response)[-1]["done"] is True  # the server goes on serving
    conn.close()


def test_a_client_that_disconnects_mid_stream_frees_its_thread_and_batch_row():
    model, tokenizer = _model_and_tokenizer()
    from phase5_production.src.served_models import ServedModel

    served = ServedModel.wrap(model, tokenizer)
    fast_logits = served.logits
    served.logits = lambda idx: (time.sleep(0.02), fast_logits(idx))[1]  # 500 tokens would take 10 s
    server = make_server(
        served, port=0, max_connections=1, limits={"max_new_tokens": 500}, kv_cache=False
    )  # kv_cache=False: every step goes through the slowed-down served.logits
    thread = _start(server)
    try:
        conn, response = _post(server, {"prompt": "ab", "max_new_tokens": 500, "temperature": 0})
        for _ in range(3):
            assert response.readline().startswith(b"data: ")
            response.readline()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + 5
        while server.engine.active_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.engine.active_requests == 0  # the request was cancelled, not run to 500 tokens
        assert server.engine.steps < 100
        conn = _connection(server)  # the single connection slot is free again
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        _stop(server, thread)


def _checkpoint_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        server_main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


def test_a_missing_truncated_or_foreign_checkpoint_gives_a_one_line_error(tmp_path, capsys):
    assert "no checkpoint at" in _checkpoint_error(["--checkpoint", str(tmp_path / "missing.pt")], capsys)
    model, tokenizer = _model_and_tokenizer()
    good = tmp_path / "good.pt"
    save_served_checkpoint(good, model, tokenizer)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "not a readable checkpoint" in _checkpoint_error(["--checkpoint", str(truncated)], capsys)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert "not a Sparse MoE checkpoint" in _checkpoint_error(["--checkpoint", str(foreign)], capsys)
    mismatched = tmp_path / "mismatched.pt"  # a Phase 2 checkpoint whose weights do not fit its config
    torch.save(
        {"config": {"vocab_size": 3, "block_size": 8}, "tokenizer_chars": ["a", "b", "c"], "model": {}},
        mismatched,
    )
    assert "does not hold a Phase 2 GPT" in _checkpoint_error(["--checkpoint", str(mismatched)], capsys)
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    assert "no checkpoint in" in _checkpoint_error(["--checkpoint", str(empty_folder)], capsys)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "not a readable checkpoint" in _checkpoint_error(["--checkpoint", str(text)], capsys)


def test_the_default_length_never_exceeds_the_servers_limit():
    """Found by fuzzing: an omitted max_new_tokens / max_tokens defaulted above a lower server limit."""
    model, tokenizer = _model_and_tokenizer()
    server = make_server(model, tokenizer, port=0, name="m", limits={"max_new_tokens": 5})
    thread = _start(server)
    try:
        conn, response = _post(server, {"prompt": "ab", "temperature": 0})
        assert response.status == 200 and _events(response)[-1]["generated_tokens"] == 5
        conn.close()
        conn, response = _post(server, {"model": "m", "prompt": "ab"}, path="/v1/completions")
        assert response.status == 200 and json.loads(response.read())["usage"]["completion_tokens"] == 5
        conn.close()
    finally:
        _stop(server, thread)
