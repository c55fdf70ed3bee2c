"""The server against a round of hostile and careless clients, over a real socket on 127.0.0.1.

Each test is a probe that failed before its fix: clients that leave mid-request, idle connections,
invalid Unicode, the neutral values OpenAI clients send by default, prompts longer than the context,
a checkpoint with NaN weights, and huge stop strings.
"""

import http.client
import json
import socket
import threading
import time

import pytest
import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase3_components.src.char_tokenizer import CharTokenizer
from phase5_production.src.request_parsing import MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from phase5_production.src.served_models import ServedModel, load_served_model, save_served_checkpoint
from phase5_production.src.server import main as server_main
from phase5_production.src.server import make_server
from phase5_production.src.text_streaming import TextAssembler

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"
NAME = "probe-gpt"
CONTEXT = 32


def _model_and_tokenizer():
    tokenizer = CharTokenizer(ALPHABET)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=CONTEXT, n_layer=2, n_head=2, d_model=32)
    model = GPT(config)
    return model.eval(), tokenizer


def _start(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def _stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def served():
    model, tokenizer = _model_and_tokenizer()
    server = make_server(model, tokenizer, port=0, name=NAME, limits={"max_prompt_chars": 2000})
    thread = _start(server)
    yield server
    _stop(server, thread)


def _post(server, body, path="/v1/completions", raw: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    try:
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _wait_until(condition, timeout: float = 20.0) -> None:
    """Poll `condition` until it holds; fail (not hang) if it does not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the server did not get there"
        time.sleep(0.01)


def _completion(**fields) -> dict:
    return {"model": NAME, "prompt": "ab", "max_tokens": 3, "temperature": 0, **fields}


# ---------------------------------------------------------------------------------------------
# Clients that leave: their batch rows are freed at the next token, and the log stays quiet
# ---------------------------------------------------------------------------------------------


def test_abandoned_requests_free_their_batch_rows_at_the_next_token(capsys):
    model, tokenizer = _model_and_tokenizer()
    served = ServedModel.wrap(model, tokenizer, NAME)
    server = make_server(served, port=0, verbose=True, limits={"max_new_tokens": 500}, kv_cache=False)
    submitted, gate = [], threading.Event()
    submit, step = server.engine.submit, server.engine.next_token_logits

    def gated_step(batch):  # after 3 tokens the model waits until the clients have left
        if server.engine.steps >= 3:
            gate.wait(timeout=10)
            time.sleep(0.005)  # a model of realistic speed: the handler threads get to run between steps
        return step(batch)

    server.engine.submit = lambda request: submitted.append(request) or submit(request)
    server.engine.next_token_logits = gated_step
    thread = _start(server)
    try:
        body = json.dumps(_completion(max_tokens=500, temperature=1.0)).encode()
        clients = []
        for stream in (False, True, False, True):
            sock = socket.create_connection(server.server_address[:2], timeout=10)
            payload = body if not stream else body.replace(b'"temperature"', b'"stream": true, "temperature"')
            head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n"
            sock.sendall(head.encode() + payload)
            clients.append(sock)
        _wait_until(lambda: len(submitted) == 4 and server.engine.steps >= 3)
        for sock in clients:  # the clients leave while their requests wait for the model
            sock.close()
        gate.set()
        _wait_until(lambda: all(r.finish_reason is not None for r in submitted))
        assert all(r.finish_reason == "cancelled" for r in submitted), [r.finish_reason for r in submitted]
        assert max(len(r.generated) for r in submitted) < 100  # not 500: freed within a few tokens
        status, reply = _post(server, _completion())  # the next client is served at once
        assert status == 200 and reply["usage"]["completion_tokens"] == 3
    finally:
        _stop(server, thread)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err and "ConnectionReset" not in err, err


# ---------------------------------------------------------------------------------------------
# Idle connections cannot starve the server
# ---------------------------------------------------------------------------------------------


def test_idle_connections_hold_no_slot_and_health_is_always_served():
    model, tokenizer = _model_and_tokenizer()
    server = make_server(model, tokenizer, port=0, name=NAME, max_connections=4, read_timeout=30)
    assert server.header_timeout < server.read_timeout / 2  # the headers' deadline is much shorter
    thread = _start(server)
    address = server.server_address[:2]
    idle = [socket.create_connection(address, timeout=10) for _ in range(40)]  # 10x max_connections
    try:
        for _ in range(3):
            conn = http.client.HTTPConnection(*address, timeout=10)
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
            conn.close()
            status, reply = _post(server, _completion())
            assert status == 200 and reply["usage"]["completion_tokens"] == 3
    finally:
        for sock in idle:
            sock.close()
        _stop(server, thread)


def test_generations_beyond_the_slots_get_503_while_health_answers():
    model, tokenizer = _model_and_tokenizer()
    server = make_server(model, tokenizer, port=0, name=NAME, max_connections=1)
    gate, step = threading.Event(), server.engine.next_token_logits
    server.engine.next_token_logits = lambda batch: (gate.wait(timeout=10), step(batch))[1]
    thread = _start(server)
    result = {}
    first = threading.Thread(target=lambda: result.setdefault("first", _post(server, _completion())))
    try:
        first.start()  # holds the only slot while the model waits at the gate
        _wait_until(lambda: server.engine.active_requests == 1)
        status, reply = _post(server, _completion())
        assert status == 503 and "limit of 1 requests" in reply["error"]["message"], reply
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        gate.set()
        first.join(timeout=20)
        _stop(server, thread)
    assert result["first"][0] == 200
    assert result["first"][1]["usage"]["completion_tokens"] == 3


def test_a_request_line_then_silence_is_dropped_at_the_header_deadline():
    """A client that sends a request line but not its headers is cut after header_timeout, well
    before the body's read_timeout (30 s): recv returns within the socket's 10 s timeout."""
    model, tokenizer = _model_and_tokenizer()
    server = make_server(model, tokenizer, port=0, read_timeout=30, header_timeout=0.5)
    thread = _start(server)
    try:
        with socket.create_connection(server.server_address[:2], timeout=10) as sock:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
            reply = b""
            while chunk := sock.recv(65536):  # socket.timeout (a failure) if the server waits 30 s
                reply += chunk
        assert reply == b"" or b"408" in reply.split(b"\r\n")[0]
    finally:
        _stop(server, thread)


# ---------------------------------------------------------------------------------------------
# Bad input: invalid Unicode, OpenAI's neutral defaults, prompts longer than the context
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,field",
    [
        ("/v1/completions", "prompt"),
        ("/v1/completions", "stop"),
        ("/v1/completions", "model"),
        ("/generate", "prompt"),
    ],
)
def test_a_lone_surrogate_gets_400(served, path, field):
    body = _completion() if path == "/v1/completions" else {"prompt": "ab", "max_new_tokens": 3}
    body[field] = "a\ud800b"
    raw = json.dumps(body).encode()  # json escapes the surrogate as \\ud800: valid JSON, invalid text
    status, reply = _post(served, None, path, raw=raw)
    message = json.dumps(reply)
    assert status == 400 and "surrogate" in message and field in message, reply


@pytest.mark.parametrize(
    "fields",
    [
        {"presence_penalty": 0, "frequency_penalty": 0.0},
        {"best_of": 1, "n": 1},
        {"logit_bias": {}},
        {"echo": False, "suffix": "", "logprobs": None, "user": "someone"},
    ],
)
def test_neutral_values_of_unsupported_openai_fields_are_accepted(served, fields):
    status, reply = _post(served, _completion(**fields))
    assert status == 200 and reply["usage"]["completion_tokens"] == 3, reply


@pytest.mark.parametrize(
    "fields,name",
    [
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"best_of": 2}, "best_of"),
        ({"n": 2}, "n"),
        ({"logit_bias": {"3": 10}}, "logit_bias"),
        ({"echo": True}, "echo"),
        ({"logprobs": 2}, "logprobs"),
        ({"suffix": "end"}, "suffix"),
        ({"presence_penalty": False}, "presence_penalty"),
        ({"user": 3}, "user"),
    ],
)
def test_non_neutral_values_of_unsupported_fields_get_400(served, fields, name):
    status, reply = _post(served, _completion(**fields))
    assert status == 400 and reply["error"]["param"] == name, reply
    assert "not supported" in reply["error"]["message"] or "must be" in reply["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/generate"])
def test_a_prompt_longer_than_the_context_gets_400_naming_the_limit(served, path):
    long_prompt = "ab " * 40  # 120 characters = 120 tokens > the 32-token context
    body = _completion(prompt=long_prompt) if path == "/v1/completions" else {"prompt": long_prompt}
    status, reply = _post(served, body, path)
    message = json.dumps(reply)
    assert status == 400 and "120 tokens" in message and f"context of {CONTEXT}" in message, reply
    status, _ = _post(served, _completion(prompt="ab " * 10 + "a"))  # 31 tokens fit: served
    assert status == 200


# ---------------------------------------------------------------------------------------------
# A checkpoint with NaN weights is refused at start
# ---------------------------------------------------------------------------------------------


def test_a_checkpoint_with_nan_weights_is_refused_at_start(tmp_path, capsys):
    model, tokenizer = _model_and_tokenizer()
    with torch.no_grad():
        model.blocks[0].attn.q_proj.weight[0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    save_served_checkpoint(path, model, tokenizer)
    with pytest.raises(ValueError, match="NaN/inf"):
        load_served_model(path)
    with pytest.raises(SystemExit) as info:
        server_main(["--checkpoint", str(path), "--port", "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "NaN/inf" in err and "q_proj" in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------
# Stop strings: bounded in count and size, matched in linear time
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stop,fragment",
    [
        (["a" * (MAX_STOP_CHARS + 1)], f"{MAX_STOP_CHARS} characters"),
        (["x"] * (MAX_STOP_SEQUENCES + 1), f"1 to {MAX_STOP_SEQUENCES}"),
    ],
)
def test_stop_strings_are_bounded_in_count_and_size(served, stop, fragment):
    status, reply = _post(served, _completion(stop=stop))
    assert status == 400 and fragment in reply["error"]["message"] and reply["error"]["param"] == "stop"
    status, _ = _post(served, _completion(stop=["a" * MAX_STOP_CHARS] * MAX_STOP_SEQUENCES))
    assert status == 200  # at the limits: served


class _Chars:
    """A served model stand-in whose tokens are characters."""

    def __init__(self):
        self.decode = lambda ids: "".join(map(chr, ids))


def test_stop_matching_scans_only_the_new_tail():
    """The work per token is bounded by the longest stop string, not by the text generated so far:
    the characters searched over a long generation stay linear in its length."""
    stops = ("b" * MAX_STOP_CHARS, "ab" * (MAX_STOP_CHARS // 2) + "c", "zz")
    assembler = TextAssembler(_Chars(), stops)
    text = ("ab" * MAX_STOP_CHARS) * 4 + "x"  # runs up to every stop, completes none
    released = "".join(assembler.add(ord(ch)) for ch in text) + assembler.flush()
    assert released == text and not assembler.stopped
    assert assembler.scanned_chars <= len(text) * len(stops)  # each character fed once to each matcher
    assembler = TextAssembler(_Chars(), ("needle",))
    released = "".join(assembler.add(ord(ch)) for ch in "hay" * 100 + "needle and more")
    assert assembler.stopped and released == "hay" * 100  # a stop spanning many tokens is found
