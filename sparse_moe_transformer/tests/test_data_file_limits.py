"""A data file too large to read is refused from its size alone, before a byte of it is read, with one
line naming the limit and the fix. The files are sparse (truncate): the tests write no real data."""

import pytest

from sparse_moe_transformer.src import cli, data_sources
from sparse_moe_transformer.src.data_sources import load_documents, make_data_source

GIB = 2**30


def _sparse(path, size: int):
    with open(path, "wb") as f:
        f.truncate(size)  # a hole: the size is on disk, the bytes are not
    return path


@pytest.fixture
def no_reading(monkeypatch):
    """Fail the test if the reader is reached: the check must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the file was read before its size was checked")

    monkeypatch.setattr(data_sources, "load_text_dataset", refuse)


def test_a_huge_text_file_is_refused_before_it_is_read(tmp_path, no_reading):
    big = _sparse(tmp_path / "big.txt", 3 * GIB)
    for limit in (2.0, 8.0):  # a plain-text file cannot be read above 2 GiB, whatever --max-file-gb says
        with pytest.raises(ValueError) as err:
            make_data_source(data_files=str(big), max_file_gb=limit)
        message = str(err.value)
        assert str(big) in message and "3.00 GiB" in message and "at most 2 GiB" in message
        assert "convert it to .jsonl" in message and len(message.splitlines()) == 1


def test_a_file_above_the_limit_names_the_flag_that_raises_it(tmp_path, no_reading):
    big = _sparse(tmp_path / "big.jsonl", 3 * GIB)
    with pytest.raises(ValueError, match=r"big\.jsonl is 3\.00 GiB, above the limit of 2 GiB") as err:
        make_data_source(data_files=str(big))
    assert "--max-file-gb 3" in str(err.value)
    # the check also guards the reader itself, for a source built before the file grew
    small = _sparse(tmp_path / "small.jsonl", 10)
    source = make_data_source(data_files=str(small), max_file_gb=2.0)
    _sparse(small, 3 * GIB)
    with pytest.raises(ValueError, match="above the limit of 2 GiB"):
        load_documents(source)


def test_a_raised_limit_lets_the_file_through_to_the_reader(tmp_path, monkeypatch):
    big = _sparse(tmp_path / "big.jsonl", 3 * GIB)
    reached = []
    monkeypatch.setattr(data_sources, "load_text_dataset", lambda *a, **k: reached.append(a) or ["a story."])
    source = make_data_source(data_files=f"{big},{big}", max_file_gb=4)
    docs = load_documents(source)
    assert reached and docs["train"] == ["a story."]


def test_the_cli_refuses_a_huge_file_in_one_line(tmp_path, capsys, no_reading):
    big = _sparse(tmp_path / "big.txt", 3 * GIB)
    argv = ["--mode", "train", "--preset", "tiny", "--data-files", big, "--out-dir", tmp_path / "run"]
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv + ["--cache-dir", tmp_path / "cache"]])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3.00 GiB" in err and "convert it to .jsonl" in err
    assert not (tmp_path / "cache").exists()  # refused before any token was written
