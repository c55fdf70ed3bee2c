"""POST /v1/completions end to end over a real socket on 127.0.0.1: with the official `openai`
client (streaming and not) and with plain HTTP."""

import http.client
import json
import threading

import httpx
import openai
import pytest
import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase3_components.src.char_tokenizer import CharTokenizer
from phase5_production.src.kv_cache import generate_with_cache
from phase5_production.src.server import make_server

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"
NAME = "tiny-gpt"


def _model_and_tokenizer(nan_logits: bool = False):
    tokenizer = CharTokenizer(ALPHABET)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, d_model=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)  # peaked predictions: greedy output has no near-ties
        if nan_logits:
            model.lm_head.weight.fill_(float("nan"))
    return model.eval(), tokenizer


def _serve(model, tokenizer):
    server = make_server(model, tokenizer, port=0, name=NAME)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def _client(server) -> openai.OpenAI:
    host, port = server.server_address[:2]
    return openai.OpenAI(
        base_url=f"http://{host}:{port}/v1",
        api_key="unused",  # the server does not check keys; the client insists on one
        max_retries=0,
        timeout=30,
        http_client=httpx.Client(trust_env=False),  # no proxy from the environment for 127.0.0.1
    )


@pytest.fixture(scope="module")
def served():
    model, tokenizer = _model_and_tokenizer()
    server, thread = _serve(model, tokenizer)
    yield server, model, tokenizer
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _greedy(model, tokenizer, prompt: str, n: int) -> str:
    idx = torch.tensor([tokenizer.encode(prompt)])
    return tokenizer.decode(generate_with_cache(model, idx, n, temperature=0)[0, idx.shape[1] :].tolist())


def test_openai_client_completion_equals_greedy_generation(served):
    server, model, tokenizer = served
    result = _client(server).completions.create(model=NAME, prompt="the cat", max_tokens=40, temperature=0)
    choice = result.choices[0]
    assert choice.text == _greedy(model, tokenizer, "the cat", 40)  # 7 + 40 > block_size: sliding window
    assert choice.finish_reason == "length" and result.object == "text_completion" and result.model == NAME
    usage = result.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (7, 40, 47)


def test_the_neutral_values_clients_send_by_default_are_accepted(served):
    server, model, tokenizer = served
    neutral = dict(presence_penalty=0, frequency_penalty=0, best_of=1, n=1, logit_bias={}, echo=False)
    client = _client(server)
    result = client.completions.create(model=NAME, prompt="the cat", max_tokens=5, temperature=0, **neutral)
    assert result.choices[0].text == _greedy(model, tokenizer, "the cat", 5)


def test_openai_client_stream_joins_to_the_same_text(served):
    server, model, tokenizer = served
    stream = _client(server).completions.create(
        model=NAME, prompt="a dog", max_tokens=20, temperature=0, stream=True
    )
    chunks = list(stream)
    assert len(chunks) > 2  # token by token, not one block
    assert "".join(c.choices[0].text for c in chunks) == _greedy(model, tokenizer, "a dog", 20)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_sequence_ends_the_text_before_it(served, stream):
    server, model, tokenizer = served
    full = _greedy(model, tokenizer, "the", 30)
    stop = full[10:12]
    expected = full[: full.find(stop)]
    result = _client(server).completions.create(
        model=NAME, prompt="the", max_tokens=30, temperature=0, stop=[stop, "zzzz"], stream=stream
    )
    if stream:
        chunks = list(result)
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, finish = result.choices[0].text, result.choices[0].finish_reason
    assert text == expected and finish == "stop"


def test_a_seeded_sample_is_reproducible_and_the_seed_matters(served):
    server, _, _ = served
    client = _client(server)

    def sample(seed):
        kwargs = dict(model=NAME, prompt="a", max_tokens=15, temperature=1.0, top_p=0.9, seed=seed)
        return client.completions.create(**kwargs).choices[0].text

    first, again = sample(3), sample(3)
    assert first == again and len(first) == 15
    assert any(sample(seed) != first for seed in (4, 5, 6))


@pytest.mark.parametrize(
    "kwargs,error,fragment",
    [
        ({"temperature": 3}, openai.BadRequestError, "temperature"),
        ({"temperature": 1e-40}, openai.BadRequestError, "temperature"),
        ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
        ({"top_p": 0}, openai.BadRequestError, "top_p"),
        ({"n": 2}, openai.BadRequestError, "'n' must be 1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop"),
        ({"prompt": "Hello!"}, openai.BadRequestError, "does not know"),
        ({"logprobs": 2}, openai.BadRequestError, "not supported"),
        ({"presence_penalty": 0.5}, openai.BadRequestError, "not supported"),
        ({"model": "gpt-4"}, openai.NotFoundError, "not served here"),
    ],
)
def test_the_openai_client_raises_on_bad_requests(served, kwargs, error, fragment):
    server, _, _ = served
    with pytest.raises(error) as info:
        _client(server).completions.create(**{"model": NAME, "prompt": "a", "max_tokens": 3, **kwargs})
    assert fragment in info.value.message


def _post(server, body: bytes):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def _data_lines(response) -> list[str]:
    return [line[6:].strip().decode() for line in response.read().split(b"\n") if line.startswith(b"data: ")]


def test_plain_http_stream_is_server_sent_events_ending_with_done(served):
    server, model, tokenizer = served
    body = {"model": NAME, "prompt": "the", "max_tokens": 12, "temperature": 0, "stream": True}
    conn, response = _post(server, json.dumps(body).encode())
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    lines = _data_lines(response)
    conn.close()
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == _greedy(model, tokenizer, "the", 12)


def test_plain_http_errors_have_the_openai_shape(served):
    server, _, _ = served
    conn, response = _post(server, b'{"model": "tiny-gpt", "prompt": "a", "temperature": "hot"}')
    payload = json.loads(response.read())
    conn.close()
    assert response.status == 400
    assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["param"] == "temperature"
    conn, response = _post(server, b"[" * 30_000)
    assert response.status == 400 and "error" in json.loads(response.read())
    conn.close()


def test_models_endpoint_names_the_served_model(served):
    server, _, _ = served
    assert [m.id for m in _client(server).models.list()] == [NAME]


def test_a_failure_while_streaming_reaches_the_openai_client_as_an_error():
    model, tokenizer = _model_and_tokenizer(nan_logits=True)
    server, thread = _serve(model, tokenizer)
    try:
        client = _client(server)
        stream = client.completions.create(model=NAME, prompt="ab", max_tokens=5, temperature=1, stream=True)
        with pytest.raises(openai.APIError, match="sampling failed"):
            list(stream)
        with pytest.raises(openai.InternalServerError, match="sampling failed"):
            client.completions.create(model=NAME, prompt="ab", max_tokens=5, temperature=1)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
