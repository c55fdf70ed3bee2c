"""The server loads any kind of checkpoint a loader claims: Phase 2's own, one registered in the process,
or one an installed package names in the `llm_foundation.served_models` entry point group. A checkpoint
no loader claims, or a loader that cannot be imported, is a one-line error naming the fix."""

import pytest
import torch

from phase2_architecture.src.gpt import GPT, GPTConfig
from phase3_components.src.char_tokenizer import CharTokenizer
from phase5_production.src import served_models
from phase5_production.src.served_models import (
    LOADER_ENTRY_POINTS,
    ServedModel,
    load_served_model,
    register_loader,
    registered_loaders,
    save_served_checkpoint,
)


def _gpt_and_tokenizer():
    tokenizer = CharTokenizer.from_text("hello world")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2, d_model=16))
    return model, tokenizer


@pytest.fixture
def loaders(monkeypatch):
    """The loader table, restored after the test (a registration must not leak into other tests)."""
    monkeypatch.setattr(served_models, "_LOADERS", dict(served_models._LOADERS))
    monkeypatch.setattr(served_models, "_ENTRY_POINTS_READ", served_models._ENTRY_POINTS_READ)
    return served_models._LOADERS


def test_a_phase2_checkpoint_is_served_by_the_built_in_loader(tmp_path):
    model, tokenizer = _gpt_and_tokenizer()
    save_served_checkpoint(tmp_path / "tiny.pt", model, tokenizer)
    served = load_served_model(tmp_path / "tiny.pt")
    assert (served.kind, served.name, served.context_length) == ("gpt", "tiny", 8)
    idx = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(served.logits(idx), model(idx)[0])


def test_a_registered_loader_serves_the_checkpoints_it_claims_and_only_those(tmp_path, loaders):
    model, tokenizer = _gpt_and_tokenizer()
    torch.save({"format": "toy", "n": 3}, tmp_path / "toy.pt")
    (tmp_path / "toy_run").mkdir()
    seen = []

    def can_load(path, contents):
        seen.append((path.name, contents))
        return (contents or {}).get("format") == "toy" or path.name == "toy_run"

    def load(path, name):
        return ServedModel("toy", name, model, tokenizer, 8)

    register_loader("toy", can_load, load)
    assert [loader.kind for loader in registered_loaders()][0] == "gpt"  # Phase 2's own loader asks first
    assert load_served_model(tmp_path / "toy.pt").kind == "toy"
    assert load_served_model(tmp_path / "toy_run", name="mine").name == "mine"
    assert seen[0] == ("toy.pt", {"format": "toy", "n": 3}) and seen[1] == ("toy_run", None)
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"registered loader \(gpt, .*toy\).*pip install -e \.") as err:
        load_served_model(tmp_path / "other.pt")
    assert len(str(err.value).splitlines()) == 1


def test_a_folder_no_loader_claims_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint in .*pip install -e ."):
        load_served_model(tmp_path)


def test_loaders_named_by_installed_entry_points_are_registered_once(monkeypatch, loaders):
    model, tokenizer = _gpt_and_tokenizer()
    imported = []

    class EntryPoint:
        name, value = "toy", "some_package.serving:loader"

        def load(self):
            imported.append(self.value)
            return served_models.ServedModelLoader("toy", lambda path, contents: False, lambda p, n: None)

    def entry_points(group):
        assert group == LOADER_ENTRY_POINTS
        return [EntryPoint()]

    monkeypatch.setattr(served_models, "entry_points", entry_points)
    served_models._ENTRY_POINTS_READ = False  # the fixture restores it
    assert "toy" in [loader.kind for loader in registered_loaders()]
    registered_loaders()
    assert imported == ["some_package.serving:loader"]  # read once per process


def test_a_loader_that_cannot_be_imported_is_an_error_naming_the_reinstall(monkeypatch, loaders):
    class EntryPoint:
        name, value = "gone", "moved_package.serving:loader"

        def load(self):
            raise ModuleNotFoundError("No module named 'moved_package'")

    monkeypatch.setattr(served_models, "entry_points", lambda group: [EntryPoint()])
    served_models._ENTRY_POINTS_READ = False  # the fixture restores it
    with pytest.raises(ImportError, match=r"'gone' = 'moved_package.serving:loader'.*pip install -e \."):
        registered_loaders()


def test_wrap_serves_a_phase2_gpt_and_refuses_other_models():
    model, tokenizer = _gpt_and_tokenizer()
    assert ServedModel.wrap(model, tokenizer).kind == "gpt"
    with pytest.raises(TypeError, match="register_loader"):
        ServedModel.wrap(torch.nn.Linear(2, 2), tokenizer)
    other = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="does not match the model's vocab_size"):
        ServedModel("gpt", "m", model, other, 8)
