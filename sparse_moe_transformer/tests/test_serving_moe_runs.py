"""Phase 5's server serves a Sparse MoE run written by `train.py --mode train` through the MoE's own
loader (sparse_moe_transformer/src/serving.py), found through an entry point: over a real socket on
127.0.0.1 the completions equal the MoE's own greedy generate, batched rows equal lone requests."""

import os
import subprocess
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path

import httpx
import openai
import pytest
import torch

from phase5_production.src.batching import BatchingEngine, GenerationRequest
from phase5_production.src.served_models import LOADER_ENTRY_POINTS, load_served_model
from phase5_production.src.server import make_server
from sparse_moe_transformer.src import serving
from sparse_moe_transformer.src.cli import main as train_main
from sparse_moe_transformer.src.train import SparseMoETransformer, preset_config

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """A tiny MoE trained for 2 steps by the real CLI (a few seconds): a run folder with best.pt."""
    root = tmp_path_factory.mktemp("moe")
    data = "--dataset synthetic --synthetic-stories 50 --tokenizer bpe --vocab-size 300".split()
    fast = (
        "--max-steps 2 --warmup-steps 0 --batch-size 2 --eval-interval 2 --eval-batches 1 --sample-tokens 0"
    )
    argv = ["--mode", "train", "--preset", "tiny", *data, *fast.split()]
    argv += ["--cache-dir", root / "cache", "--out-dir", root / "run"]
    train_main([str(a) for a in argv])
    return root / "run"


@pytest.fixture(scope="module")
def served(moe_run):
    served = load_served_model(moe_run)
    server = make_server(served, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, served
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _client(server) -> openai.OpenAI:
    host, port = server.server_address[:2]
    return openai.OpenAI(
        base_url=f"http://{host}:{port}/v1",
        api_key="unused",
        max_retries=0,
        timeout=30,
        http_client=httpx.Client(trust_env=False),
    )


def _reference(served, prompt: str, max_new_tokens: int) -> tuple[str, str]:
    """The MoE's own KV-cached greedy generate: (text up to end-of-text, finish reason)."""
    ids = torch.tensor([served.encode(prompt)])
    eot = served.tokenizer.eot_id
    new = served.model.generate(ids, max_new_tokens, temperature=0, eos_token_id=eot)[
        0, ids.shape[1] :
    ].tolist()
    if eot in new:
        return served.decode(new[: new.index(eot)]), "stop"
    return served.decode(new), "length"


def test_a_moe_run_folder_loads_as_a_served_moe(moe_run):
    served = load_served_model(moe_run)
    assert served.kind == "moe" and served.name == "run" and served.exact_batching
    assert served.context_length == served.model.config.block_size == 32
    assert served.stop_token_ids == (served.tokenizer.eot_id,)
    assert load_served_model(moe_run / "best.pt").name == "best"


@pytest.mark.parametrize("prompt", ["Once upon a time", "The dog"])
def test_openai_client_completion_equals_the_moe_greedy_generate(served, prompt):
    server, model = served
    expected, finish = _reference(model, prompt, 16)
    assert len(expected) > 8  # varied text, not an immediate end-of-text
    result = _client(server).completions.create(model="run", prompt=prompt, max_tokens=16, temperature=0)
    assert (result.choices[0].text, result.choices[0].finish_reason) == (expected, finish)
    stream = _client(server).completions.create(
        model="run", prompt=prompt, max_tokens=16, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == finish


def test_health_describes_the_moe(served):
    server, model = served
    health = httpx.Client(trust_env=False).get(f"http://127.0.0.1:{server.server_address[1]}/health").json()
    assert health["kind"] == "moe" and health["model"]["n_expert"] == model.model.config.n_expert
    assert health["context_length"] == 32 and health["max_batch_size"] == 16


def test_batched_moe_rows_generate_what_each_request_generates_alone(served):
    _, model = served
    prompts = [model.encode(text) for text in ("Once", "The cat sat", "A", "Tom and Lily went to")]
    results = []
    for max_batch_size in (16, 1):
        engine = BatchingEngine(model.next_token_step(), max_batch_size=max_batch_size)
        try:
            requests = [GenerationRequest(p, 12, temperature=0) for p in prompts]
            requests += [GenerationRequest(p, 12, temperature=0.8, top_p=0.9, seed=7) for p in prompts]
            for request in requests:
                engine.submit(request)
            for request in requests:
                list(request.events(timeout=60))
            results.append([r.generated for r in requests])
        finally:
            engine.close()
    assert results[0] == results[1]


def test_a_moe_with_an_expert_capacity_is_served_one_request_at_a_time(served):
    _, model = served
    config = preset_config("tiny", vocab_size=model.vocab_size, capacity_factor=1.0)
    capped = serving.serve_moe(SparseMoETransformer(config), model.tokenizer)
    assert not capped.exact_batching  # rows compete for expert slots: batching would change outputs
    server = make_server(capped, port=0)
    try:
        assert server.engine.max_batch_size == 1
    finally:
        server.server_close()


def test_pyproject_declares_and_the_install_registers_the_moe_loader():
    value = "sparse_moe_transformer.src.serving:loader"
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'[project.entry-points."{LOADER_ENTRY_POINTS}"]\nmoe = "{value}"\n' in pyproject
    installed = {entry_point.name: entry_point for entry_point in entry_points(group=LOADER_ENTRY_POINTS)}
    assert "moe" in installed, "the installed metadata lacks the MoE loader: run `pip install -e .`"
    assert installed["moe"].value == value
    assert installed["moe"].load() is serving.loader and serving.loader.kind == "moe"


def test_the_server_command_finds_the_moe_loader_through_the_entry_point_alone(moe_run):
    """`python phase5_production/src/server.py --checkpoint RUN` in a fresh process: Phase 5 imports nothing
    of the MoE, so only the installed entry point can lead it to the MoE's loader."""
    command = [sys.executable, "phase5_production/src/server.py", "--checkpoint", str(moe_run), "--port", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()  # "serving moe model 'run' on http://127.0.0.1:PORT (...)"
        if not line:
            pytest.fail(f"the server exited: {process.communicate()[1]}")
        assert line.startswith("serving moe model 'run' on http://127.0.0.1:"), line
        url = line.split(" on ")[1].split()[0]
        health = httpx.Client(trust_env=False).get(f"{url}/health", timeout=30).json()
        assert health["kind"] == "moe" and health["context_length"] == 32 and health["routing"]["top_k"] >= 1
    finally:
        process.terminate()
        process.communicate(timeout=30)
