"""The server's checkpoint readers refuse NaN/inf weights with one line naming the file and the tensor,
for a Phase 2 GPT checkpoint and for a Sparse MoE checkpoint alike (checksum or not)."""

import pytest
import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase2_architecture.src.training_utils import NonFiniteWeightsError
from phase3_components.src.char_tokenizer import CharTokenizer
from phase5_production.src.served_models import load_served_model, save_served_checkpoint
from sparse_moe_transformer.src.checkpointing import LATEST_NAME
from sparse_moe_transformer.src.cli import main as train_main


def test_a_phase2_checkpoint_with_nan_weights_is_refused(tmp_path):
    tokenizer = CharTokenizer.from_text("hello world")
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=2, n_head=2, d_model=16))
    with torch.no_grad():
        model.blocks[0].attn.q_proj.weight[1, 1] = float("nan")
    path = tmp_path / "gpt.pt"
    save_served_checkpoint(path, model, tokenizer)
    with pytest.raises(NonFiniteWeightsError, match=r"blocks\.0\.attn\.q_proj\.weight") as err:
        load_served_model(path)
    assert str(path) in str(err.value) and len(str(err.value).splitlines()) == 1


def test_a_moe_checkpoint_with_nan_weights_and_no_checksum_is_refused(tmp_path):
    data = "--dataset synthetic --synthetic-stories 50 --tokenizer bpe --vocab-size 300".split()
    fast = "--max-steps 1 --warmup-steps 0 --batch-size 2 --eval-interval 0 --sample-tokens 0"
    argv = ["--mode", "train", "--preset", "tiny", *data, *fast.split()]
    train_main([str(a) for a in [*argv, "--cache-dir", tmp_path / "cache", "--out-dir", tmp_path / "run"]])
    checkpoint = torch.load(tmp_path / "run" / LATEST_NAME, map_location="cpu", weights_only=True)
    checkpoint.pop("checksum")  # as in the files written before checksums existed
    checkpoint["model"]["lm_head.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(checkpoint, path)
    with pytest.raises(NonFiniteWeightsError, match=r"lm_head\.weight") as err:
        load_served_model(path)
    assert str(path) in str(err.value) and len(str(err.value).splitlines()) == 1
