"""The batching engine: every request gets exactly what it gets alone, in one forward pass per step,
with right-padded windows (any causal model) or per-request KV caches (the Phase 2 GPT)."""

import runpy
import threading
import time
from pathlib import Path

import pytest
import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase5_production.src.batching import (
    BatchingEngine,
    GenerationRequest,
    KVCachedGPTStep,
    PaddedBatchStep,
    batched_cached_decode,
    batched_next_token_logits,
)
from phase5_production.src.kv_cache import KVCache, forward_with_cache, generate_with_cache

VOCAB, BLOCK = 29, 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, d_model=32))
    with torch.no_grad():
        for p in gpt.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)  # peaked predictions: greedy output has no near-ties
    return gpt.eval()


def _logits_fn(model):
    return lambda idx: model(idx)[0]


def _step(model, kind: str):
    return KVCachedGPTStep(model) if kind == "kv" else PaddedBatchStep(_logits_fn(model), BLOCK)


STEPS = ["padded", "kv"]


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]  # fmt: skip


def _run(engine: BatchingEngine, requests: list[GenerationRequest]) -> list[list[int]]:
    for request in requests:
        engine.submit(request)
    for request in requests:
        assert [kind for kind, _ in request.events(timeout=60)][-1] == "done"
    return [request.generated for request in requests]


def test_each_row_of_a_padded_batch_gets_the_logits_of_its_window_alone(model):
    windows = _prompts(6)
    batched = batched_next_token_logits(_logits_fn(model), windows)  # [6, V]
    for row, window in enumerate(windows):
        alone = model(torch.tensor([window]))[0][0, -1]  # [V]
        torch.testing.assert_close(batched[row], alone, rtol=0, atol=1e-5)


def rope_gqa_gpt():
    """A GPT with rotary positions and grouped-query attention (4 query heads share 2 key/value heads)."""
    torch.manual_seed(1)
    config = GPTConfig(
        vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, d_model=32, pos="rope", n_kv_head=2
    )
    return GPT(config).eval()


def test_a_batched_cached_decode_row_equals_forward_with_cache_alone(model):
    check_batched_cached_decode(model)


def test_batched_cached_decode_with_rope_and_grouped_query_attention():
    """Each row is rotated by its own position, and only the shared key/value heads are cached."""
    check_batched_cached_decode(rope_gqa_gpt())


def check_batched_cached_decode(model):
    """Rows with caches of different lengths, one new token each: same logits, same caches."""
    prompts = _prompts(5, seed=3)
    new_tokens = [3, 7, 11, 0, 28]
    batched_caches, alone_logits, alone_caches = [], [], []
    for prompt, token in zip(prompts, new_tokens):
        for caches in (batched_caches, alone_caches):
            caches.append(KVCache.for_model(model))
            forward_with_cache(model, torch.tensor([prompt]), caches[-1])
        alone_logits.append(forward_with_cache(model, torch.tensor([[token]]), alone_caches[-1])[0, -1])
    batched = batched_cached_decode(model, new_tokens, batched_caches)  # [5, V]
    torch.testing.assert_close(batched, torch.stack(alone_logits), rtol=0, atol=1e-5)
    for mine, theirs in zip(batched_caches, alone_caches):
        assert mine.length == theirs.length
        for layer in range(model.config.n_layer):
            torch.testing.assert_close(mine.keys[layer], theirs.keys[layer], rtol=0, atol=1e-6)
            torch.testing.assert_close(mine.values[layer], theirs.values[layer], rtol=0, atol=1e-6)


def _requests(prompts, max_new_tokens, **knobs):
    return [GenerationRequest(p, max_new_tokens + i, **knobs) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("kind", STEPS)
def test_batched_greedy_generation_equals_each_request_alone_and_the_kv_cache_reference(model, kind):
    prompts = _prompts(6)
    batched_engine = BatchingEngine(_step(model, kind), max_batch_size=16)
    alone_engine = BatchingEngine(_step(model, kind), max_batch_size=1)
    try:
        batched = _run(batched_engine, _requests(prompts, 30, temperature=0))  # 11 + 35 > 32: window slides
        alone = _run(alone_engine, _requests(prompts, 30, temperature=0))
    finally:
        batched_engine.close()
        alone_engine.close()
    assert batched == alone
    assert batched_engine.largest_batch == 6 and alone_engine.largest_batch == 1
    assert batched_engine.steps < alone_engine.steps  # fewer forward passes for the same tokens
    for prompt, tokens in zip(prompts, batched):
        reference = generate_with_cache(model, torch.tensor([prompt]), len(tokens), temperature=0)
        assert tokens == reference[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", STEPS)
def test_seeded_sampling_draws_the_same_tokens_alone_or_batched(model, kind):
    prompts = _prompts(5, seed=2)
    knobs = dict(temperature=1.0, top_k=10, top_p=0.9, repetition_penalty=1.2)
    results = []
    for max_batch_size in (16, 1):
        engine = BatchingEngine(_step(model, kind), max_batch_size=max_batch_size)
        try:
            reqs = [GenerationRequest(p, 12, seed=100 + i, **knobs) for i, p in enumerate(prompts)]
            results.append(_run(engine, reqs))
        finally:
            engine.close()
    assert results[0] == results[1]
    reference = generate_with_cache(
        model, torch.tensor([prompts[0]]), 12, generator=torch.Generator().manual_seed(100), **knobs
    )
    assert results[0][0] == reference[0, len(prompts[0]) :].tolist()


def test_a_stop_token_ends_the_request_without_being_emitted(model):
    engine = BatchingEngine(_step(model, "kv"))
    try:
        (full,) = _run(engine, [GenerationRequest([1, 2, 3], 10, temperature=0)])
        stop = full[3]
        first = full.index(stop)
        request = GenerationRequest([1, 2, 3], 10, temperature=0, stop_token_ids=(stop,))
        assert _run(engine, [request]) == [full[:first]] and request.finish_reason == "stop"
    finally:
        engine.close()


def test_a_request_joins_the_batch_while_another_runs_and_leaves_first(model):
    """Continuous batching: a short request arriving late does not wait for a long one."""
    fast = _logits_fn(model)
    engine = BatchingEngine(PaddedBatchStep(lambda idx: (time.sleep(0.005), fast(idx))[1], BLOCK))
    try:
        long = engine.submit(GenerationRequest([1], 200, temperature=0))
        assert long.queue.get(timeout=30)[0] == "token"  # the long one is running
        short = engine.submit(GenerationRequest([2], 3, temperature=0))
        assert [kind for kind, _ in short.events(timeout=30)][-1] == "done"
        assert long.finish_reason is None and engine.largest_batch == 2
        long.cancel()
        deadline = time.monotonic() + 10
        while engine.active_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert long.finish_reason == "cancelled" and len(long.generated) < 200
    finally:
        engine.close()


def test_a_failing_forward_fails_its_requests_and_the_engine_goes_on(model):
    broken = threading.Event()
    fast = _logits_fn(model)

    def logits_fn(idx):
        if broken.is_set():
            raise RuntimeError("out of memory")
        return fast(idx)

    engine = BatchingEngine(PaddedBatchStep(logits_fn, BLOCK))
    try:
        broken.set()
        request = engine.submit(GenerationRequest([1, 2], 5, temperature=0))
        kind, message = list(request.events(timeout=30))[-1]
        assert kind == "error" and "out of memory" in message
        broken.clear()
        assert _run(engine, [GenerationRequest([1, 2], 5, temperature=0)])[0]
    finally:
        engine.close()


def test_bad_engine_and_request_arguments_are_rejected(model):
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchingEngine(_step(model, "kv"), max_batch_size=0)
    with pytest.raises(ValueError, match="context_length"):
        PaddedBatchStep(_logits_fn(model), 0)
    with pytest.raises(TypeError, match="Phase 2 GPT"):
        KVCachedGPTStep(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="eval"):
        KVCachedGPTStep(GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, d_model=4)).train())
    with pytest.raises(ValueError, match="prompt_ids"):
        GenerationRequest([], 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationRequest([1], 0)


def test_the_server_benchmark_runs_at_tiny_size(capsys):
    """bench_server.py end to end (it checks itself that batched and serial servers answer alike)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_server.py"
    main = runpy.run_path(str(script), run_name="benchmark")["main"]
    argv = "--clients 1 3 --requests 1 --max-tokens 4 --repeats 1 --d-model 32 --n-layer 1 --block-size 32"
    rows = main(argv.split())
    assert [r["clients"] for r in rows] == [1, 3]
    assert all(r["batched_tok_s"] > 0 and r["serial_tok_s"] > 0 for r in rows)
    assert "ratio" in capsys.readouterr().out
