"""Property-based fuzzing of the server's request bodies (hypothesis), over a real socket on 127.0.0.1.

Whatever the body, the server answers: 200 with a well-formed result, or a 4xx JSON error naming
the problem; never a 5xx, never a dropped connection; and it stays healthy. One server serves
the whole property; examples are few and generations short, so this takes seconds.
"""

import http.client
import json
import threading

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase3_components.src.char_tokenizer import CharTokenizer
from phase5_production.src.request_parsing import COMPLETION_FIELDS, GENERATE_FIELDS
from phase5_production.src.server import make_server

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"
NAME = "fuzz"


@pytest.fixture(scope="module")
def server():
    tokenizer = CharTokenizer(ALPHABET)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16))
    limits = {"max_new_tokens": 6, "max_prompt_chars": 40}
    srv = make_server(model.eval(), tokenizer, port=0, name=NAME, limits=limits, read_timeout=5)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()  # NaN and infinities included (json.dumps writes NaN / Infinity)
    | st.text(max_size=20)
    | st.text(ALPHABET, min_size=1, max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


_text = st.text(ALPHABET, min_size=1, max_size=3)
VALID = {
    "prompt": st.text(ALPHABET, min_size=1, max_size=16),  # one character per token: fits the context of 16
    "model": st.just(NAME),
    "max_tokens": st.integers(1, 6),
    "max_new_tokens": st.integers(1, 6),
    "temperature": st.sampled_from([0, 0.0, 0.01, 0.5, 1, 2]),
    "top_k": st.integers(1, 29),
    "top_p": st.floats(0.01, 1),
    "repetition_penalty": st.floats(1, 5),
    "seed": st.integers(0, 2**63 - 1),
    "stop": _text | st.lists(_text, min_size=1, max_size=4),
    "n": st.just(1),
    "stream": st.booleans(),
    "return_routing": st.just(False),  # the fuzzed model is a GPT: it has no experts to report
}
INVALID = {  # out of range, wrong type, or malformed, for each field
    "prompt": st.sampled_from(["", "Hello!", "a" * 17, "a" * 41, 5, ["a"], "\ud800"]),
    "model": st.sampled_from(["other", "", 1]),
    "max_tokens": st.sampled_from([0, -1, 7, 10**6, 2.5, "3", True]),
    "max_new_tokens": st.sampled_from([0, -1, 7, 10**6, 2.5, "3", True]),
    "temperature": st.sampled_from([1e-40, 0.009, -1, 7, "1", float("nan"), float("inf")]),
    "top_k": st.sampled_from([0, -1, 30, 10**20, 1.5]),
    "top_p": st.sampled_from([0, -0.5, 1.5, 1e-320, "0.9"]),
    "repetition_penalty": st.sampled_from([0.5, 0, 6, -1]),
    "seed": st.sampled_from([-1, 2**63, 2**64, 0.5]),
    "stop": st.sampled_from(["", [], [""], ["a"] * 5, [1], {"a": 1}]),
    "n": st.sampled_from([0, 2, True, "1"]),
    "stream": st.sampled_from([0, 1, "true", []]),
    "return_routing": st.sampled_from([True, 0, "true", []]),  # True: a GPT has no routing (400)
}


def valid_bodies(fields: tuple[str, ...], required: tuple[str, ...]):
    optional = {k: VALID[k] for k in fields if k not in required}
    return st.fixed_dictionaries({k: VALID[k] for k in required}, optional=optional)


def any_bodies(fields: tuple[str, ...], required: tuple[str, ...]):
    """A valid body with one field made invalid or an unknown field added; wild JSON; raw bytes."""
    corrupted = st.tuples(valid_bodies(fields, required), st.sampled_from([*fields, "extra"])).flatmap(
        lambda pair: st.builds(lambda value: {**pair[0], pair[1]: value}, INVALID.get(pair[1], json_values))
    )
    wild = st.dictionaries(st.sampled_from([*fields, "extra"]), json_values, max_size=4)
    as_bytes = st.builds(lambda d: json.dumps(d).encode(), corrupted | wild | json_values)
    return as_bytes | st.binary(max_size=64)


def _post(server, path: str, raw: bytes):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    try:
        conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        conn.close()


def _check_answer(status: int, content_type: str, data: bytes, path: str) -> None:
    event(f"status {status}")  # pytest --hypothesis-show-statistics: how many passed validation
    assert status in (200, 400, 404), (status, data[:300])  # never 5xx, never a dropped connection
    if status != 200:
        error = json.loads(data)["error"]
        message = error["message"] if path.startswith("/v1/") else error
        assert isinstance(message, str) and len(message) > 10
        return
    if content_type == "application/json":  # a non-streamed completion
        payload = json.loads(data)
        assert payload["choices"][0]["finish_reason"] in ("length", "stop")
        return
    events = [line[6:] for line in data.split(b"\n") if line.startswith(b"data: ")]
    if path.startswith("/v1/"):
        assert events[-1] == b"[DONE]"
        events = events[:-1]
    assert all("error" not in json.loads(event) for event in events)  # a valid request does not fail


COMPLETIONS = (COMPLETION_FIELDS, ("model", "prompt"))
GENERATE = (GENERATE_FIELDS, ("prompt",))


@settings(max_examples=25, deadline=None)
@given(body=valid_bodies(*COMPLETIONS))
def test_valid_completion_bodies_get_a_well_formed_200(server, body):
    status, content_type, data = _post(server, "/v1/completions", json.dumps(body).encode())
    assert status == 200, data[:300]
    _check_answer(status, content_type, data, "/v1/completions")


@settings(max_examples=25, deadline=None)
@given(body=valid_bodies(*GENERATE))
def test_valid_generate_bodies_get_a_well_formed_200(server, body):
    status, content_type, data = _post(server, "/generate", json.dumps(body).encode())
    assert status == 200, data[:300]
    _check_answer(status, content_type, data, "/generate")


@settings(max_examples=50, deadline=None)
@given(raw=any_bodies(*COMPLETIONS))
def test_fuzzed_completion_bodies_get_a_result_or_a_clear_4xx(server, raw):
    _check_answer(*_post(server, "/v1/completions", raw), "/v1/completions")


@settings(max_examples=50, deadline=None)
@given(raw=any_bodies(*GENERATE))
def test_fuzzed_generate_bodies_get_a_result_or_a_clear_4xx(server, raw):
    _check_answer(*_post(server, "/generate", raw), "/generate")


def test_the_server_is_healthy_after_the_fuzzing(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    assert server.engine.active_requests == 0
