"""The streaming HTTP server, end to end over a real socket on 127.0.0.1."""

import http.client
import json
import socket
import threading

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
