"""Checkpoints: atomic writes survive a crash mid-save, loading is safe and checked."""

import os

import pytest
import torch
from torch import nn

from sparse_moe_transformer.src.checkpointing import (
    BEST_NAME,
    LATEST_NAME,
    check_same_config,
    load_model_state,
    read_checkpoint,
    resolve_checkpoint,
    save_moe_checkpoint,
    save_run_checkpoints,
)


def _model(seed: int, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width))


def _save(out_dir, model, step, is_best=False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return save_run_checkpoints(
        out_dir, model, opt, step, is_best=is_best, config={"d": 8}, rng=[{"torch": torch.get_rng_state()}]
    )


def test_round_trip_restores_weights_and_entries(tmp_path):
    model = _model(0)
    written = _save(tmp_path, model, step=7, is_best=True)
    assert [p.name for p in written] == [LATEST_NAME, BEST_NAME]
    ckpt = read_checkpoint(tmp_path / LATEST_NAME)
    assert ckpt["step"] == 7 and ckpt["config"] == {"d": 8}
    assert torch.equal(ckpt["rng"][0]["torch"], torch.get_rng_state())
    other = _model(1)
    load_model_state(other, ckpt)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    # best.pt is a byte-identical copy; a folder resolves to best.pt first
    assert (tmp_path / BEST_NAME).read_bytes() == (tmp_path / LATEST_NAME).read_bytes()
    assert resolve_checkpoint(tmp_path) == tmp_path / BEST_NAME
    assert resolve_checkpoint(tmp_path, prefer=LATEST_NAME) == tmp_path / LATEST_NAME


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = _model(0)
    _save(tmp_path, model, step=1)
    before = (tmp_path / LATEST_NAME).read_bytes()

    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # some bytes reach the temp file ...
        f.seek(f.tell() // 2)
        f.truncate()
        raise OSError("simulated crash: disk full")  # ... then the write fails

    monkeypatch.setattr(torch, "save", crash_midway)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, model, step=2)
    monkeypatch.setattr(torch, "save", real_save)

    assert (tmp_path / LATEST_NAME).read_bytes() == before  # untouched
    assert read_checkpoint(tmp_path / LATEST_NAME)["step"] == 1  # and loadable
    assert sorted(os.listdir(tmp_path)) == [LATEST_NAME]  # no temp file left behind


def test_corrupt_truncated_and_foreign_files_give_clear_errors(tmp_path):
    _save(tmp_path, _model(0), step=3)
    data = (tmp_path / LATEST_NAME).read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_checkpoint(tmp_path / "truncated.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_checkpoint(tmp_path / "garbage.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a Sparse MoE checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        read_checkpoint(tmp_path / "empty")


def test_the_moe_phase5_and_phase2_readers_share_one_reader_and_its_message(tmp_path):
    from phase2_architecture.src.training_utils import load_checkpoint
    from phase5_production.src.served_models import load_served_model

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    messages = []
    for read in (read_checkpoint, load_served_model, lambda path: load_checkpoint(path, _model(0))):
        with pytest.raises(ValueError) as err:
            read(garbage)
        messages.append(str(err.value).split(";")[0])  # the reader's finding, before each caller's remedy
    assert len(set(messages)) == 1 and "is not a readable checkpoint" in messages[0]


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        pass

    with pytest.raises(TypeError, match="weights_only"):
        save_moe_checkpoint(tmp_path / "x.pt", _model(0), None, 0, config=Evil())
    assert not (tmp_path / "x.pt").exists()


def test_mismatched_model_and_config_give_clear_errors(tmp_path):
    _save(tmp_path, _model(0, width=8), step=1)
    ckpt = read_checkpoint(tmp_path / LATEST_NAME)
    with pytest.raises(ValueError, match="does not match this model"):
        load_model_state(_model(0, width=16), ckpt)
    with pytest.raises(ValueError, match=r"n_layer: checkpoint 2, now 4"):
        check_same_config({"n_layer": 2, "d_model": 8}, {"n_layer": 4, "d_model": 8}, "run/latest.pt")
    check_same_config({"n_layer": 2}, {"n_layer": 2}, "run/latest.pt")  # equal: no error


def test_wrapped_models_are_refused(tmp_path):
    wrapped = nn.Module()
    wrapped.module = _model(0)
    with pytest.raises(TypeError, match="unwrapped model"):
        save_moe_checkpoint(tmp_path / "x.pt", wrapped, None, 0)
