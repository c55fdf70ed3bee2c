"""The server's `return_routing` extension: the experts it reports for each token are the model's own.

A tiny MoE trained for a few steps by the real CLI is served over a real socket on 127.0.0.1. Every
reported token (prompt and completion, streamed and not) is compared with a separate forward pass,
`model.token_routing`, over the same tokens; clients that do not ask get exactly today's responses.
"""

import http.client
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase3_components.src.char_tokenizer import CharTokenizer
from phase5_production.src.served_models import load_served_model
from phase5_production.src.server import make_server

LONG_PROMPT = (
    "Once upon a time there was a little dog named Max. He liked to play in the park with his friends, "
    "and every day he ran to the big tree."
)


def serve(served, **kwargs):
    server = make_server(served, port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def moe(tiny_moe_run):
    served = load_served_model(tiny_moe_run)
    server, thread = serve(served)
    yield server, served
    stop(server, thread)


def post(server, body: dict, path="/v1/completions"):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def get(server, path: str):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    return response, response.read()


def stream_events(response) -> list:
    """The JSON of every `data:` event of a server-sent event stream (the last one is [DONE])."""
    lines = [line[6:].strip() for line in response.read().split(b"\n") if line.startswith(b"data: ")]
    assert lines[-1] == b"[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def completion(server, served, prompt, stream, **fields):
    body = {"model": served.name, "prompt": prompt, "max_tokens": 12, "temperature": 0, **fields}
    _, response = post(server, {**body, "stream": stream})
    assert response.status == 200
    return stream_events(response) if stream else json.loads(response.read())


def reference_routing(served, ids: list[int], position: int):
    """The model's own routing of token `position`: a forward pass over its context window."""
    start = max(0, position - served.context_length + 1)
    routing = served.model.token_routing(torch.tensor([ids[start : position + 1]]))
    return routing.experts[0, -1], routing.weights[0, -1]  # [L, k], [L, k]


def check_equals_the_model(served, entries: list, prompt: str) -> list[int]:
    """Assert every entry equals the model's own forward pass; return the token ids."""
    ids = [entry["token"] for entry in entries]
    prompt_ids = served.encode(prompt)
    assert ids[: len(prompt_ids)] == prompt_ids
    assert [e["index"] for e in entries] == list(range(len(ids)))
    assert [e["prompt"] for e in entries] == [i < len(prompt_ids) for i in range(len(ids))]
    for position, entry in enumerate(entries):
        experts, weights = reference_routing(served, ids, position)
        assert entry["experts"] == experts.tolist(), position
        torch.testing.assert_close(torch.tensor(entry["weights"]), weights)
        assert entry["text"] == served.decode([entry["token"]])
    return ids


def test_health_describes_the_routing_of_the_moe(moe):
    server, served = moe
    response, data = get(server, "/health")
    config = served.model.config
    expected = {"n_layer": config.n_layer, "n_expert": config.n_expert, "top_k": config.top_k}
    assert json.loads(data)["routing"] == {**expected, "capacity_factor": config.capacity_factor}


def test_reported_routing_equals_the_model_for_prompt_and_completion_not_streamed(moe):
    server, served = moe
    result = completion(server, served, "Once upon a time", stream=False, return_routing=True)
    ids = check_equals_the_model(served, result["routing"], "Once upon a time")
    usage = result["usage"]
    assert len(ids) == usage["total_tokens"] and usage["completion_tokens"] >= 1
    assert served.decode(ids[usage["prompt_tokens"] :]) == result["choices"][0]["text"]
    assert {len(e["experts"]) for e in result["routing"]} == {served.model.config.n_layer}


def test_streamed_routing_comes_one_token_per_chunk_and_equals_the_model(moe):
    server, served = moe
    # A stop string that begins with the text of a completion token: that token's text is held back
    # (it may begin the stop string), so its chunk has no text, only the token's routing.
    greedy = completion(server, served, "Once upon a time", stream=False, return_routing=True)["routing"]
    held = next(e["text"] for e in greedy if not e["prompt"] and e["text"].strip())
    events = completion(
        server, served, "Once upon a time", stream=True, return_routing=True, stop=[held + "#"]
    )
    assert any(event["choices"][0]["text"] == "" for event in events[:-1])
    assert "#" not in "".join(e["text"] for e in greedy)  # the stop string itself never comes
    n_prompt = len(served.encode("Once upon a time"))
    entries = [entry for event in events for entry in event["routing"]]
    ids = check_equals_the_model(served, entries, "Once upon a time")
    n_new = len(ids) - n_prompt
    # the first chunk carries the prompt and the first token, each later one its token, the last none
    assert n_new >= 1 and [len(e["routing"]) for e in events] == [n_prompt + 1] + [1] * (n_new - 1) + [0]
    assert served.decode(ids[n_prompt:]) == "".join(e["choices"][0]["text"] for e in events)


@pytest.mark.parametrize("stream", [False, True])
def test_tokens_past_the_context_are_routed_in_their_own_window(moe, stream):
    # The longest prompt the server accepts (a longer one is refused with a 400), then enough new
    # tokens that the window slides during generation.
    server, served = moe
    prompt = LONG_PROMPT
    while len(served.encode(prompt)) > served.context_length - 2:
        prompt = prompt[:-1]
    n_prompt = len(served.encode(prompt))
    result = completion(server, served, prompt, stream=stream, return_routing=True, max_tokens=12)
    events = result if stream else [result]
    entries = [entry for event in events for entry in event["routing"]]
    ids = check_equals_the_model(served, entries, prompt)
    assert len(ids) > served.context_length > n_prompt  # the last tokens were routed in a slid window


@pytest.mark.parametrize("stream", [False, True])
def test_without_return_routing_responses_are_unchanged(moe, stream):
    """Absent or false, the answer is today's; true only adds the "routing" field."""
    server, served = moe

    def answer(**fields):
        result = completion(server, served, "The dog", stream=stream, seed=5, temperature=1.0, **fields)
        for event in result if stream else [result]:
            assert event.pop("id").startswith("cmpl-") and isinstance(event.pop("created"), int)
        return result

    plain = answer()
    assert answer(return_routing=False) == plain
    with_routing = answer(return_routing=True)
    for event in with_routing if stream else [with_routing]:
        assert event.pop("routing") is not None
    if stream:  # one chunk per token, even where a token adds no text yet (ours only)
        with_routing = [
            e for e in with_routing if any(e["choices"][0][key] for key in ("text", "finish_reason"))
        ]
    assert with_routing == plain
    for event in plain if stream else [plain]:
        assert set(event) == {"object", "model", "choices"} | ({"usage"} if not stream else set())


def test_the_openai_client_sees_no_routing_unless_it_asks(moe):
    server, served = moe
    host, port = server.server_address[:2]
    client = openai.OpenAI(
        base_url=f"http://{host}:{port}/v1",
        api_key="unused",
        max_retries=0,
        timeout=30,
        http_client=httpx.Client(trust_env=False),
    )
    kwargs = dict(model=served.name, prompt="Once upon a time", max_tokens=10, temperature=0)
    plain = client.completions.create(**kwargs)
    asked = client.completions.create(**kwargs, extra_body={"return_routing": True})
    assert plain.model_extra == {} and asked.choices[0].text == plain.choices[0].text
    check_equals_the_model(served, asked.model_extra["routing"], "Once upon a time")


def test_a_bad_return_routing_is_a_400_naming_the_field(moe):
    server, served = moe
    _, response = post(server, {"model": served.name, "prompt": "The", "return_routing": "yes"})
    error = json.loads(response.read())["error"]
    assert response.status == 400 and error["param"] == "return_routing"
    assert error["message"] == "'return_routing' must be true or false, got 'yes'."


def test_a_gpt_has_no_routing_it_says_so_and_still_completes():
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz .")
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16))
    server, thread = serve(gpt.eval(), tokenizer=tokenizer, name="gpt")
    try:
        assert json.loads(get(server, "/health")[1])["routing"] is None
        _, response = post(server, {"model": "gpt", "prompt": "the", "return_routing": True})
        error = json.loads(response.read())["error"]
        assert response.status == 400 and error["param"] == "return_routing"
        assert "has no experts" in error["message"] and "leave the field out" in error["message"]
        _, response = post(server, {"model": "gpt", "prompt": "the", "max_tokens": 5})
        assert response.status == 200 and len(json.loads(response.read())["choices"][0]["text"]) == 5
    finally:
        stop(server, thread)


def test_a_client_that_leaves_mid_stream_frees_its_connection_and_batch_row(tiny_moe_run):
    served = load_served_model(tiny_moe_run)
    fast_logits = served.logits
    served.logits = lambda idx: (time.sleep(0.02), fast_logits(idx))[1]  # 500 tokens would take 10 s
    server, thread = serve(served, max_connections=1, limits={"max_new_tokens": 500})
    submitted = []
    submit = server.engine.submit
    server.engine.submit = lambda request: submit(submitted.append(request) or request)
    try:
        body = {"model": served.name, "prompt": "Once", "max_tokens": 500, "stream": True}
        conn, response = post(server, {**body, "return_routing": True})
        for _ in range(3):  # three chunks, each with routing
            assert b'"routing": [{' in response.readline()
            response.readline()
        conn.sock.shutdown(socket.SHUT_RDWR)  # leave mid-stream
        conn.close()
        deadline = time.monotonic() + 30  # a bound on waiting, not a speed requirement
        while server.engine.active_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.engine.active_requests == 0 and submitted[0].finish_reason == "cancelled"
        assert server.engine.steps < 100  # not run to 500 tokens
        # the one connection slot comes back (its thread may still be closing when the row is freed)
        while time.monotonic() < deadline:
            _, response = post(server, {"model": served.name, "prompt": "Once", "max_tokens": 2})
            if response.status != 503:
                break
            time.sleep(0.05)
        assert response.status == 200
    finally:
        stop(server, thread)
