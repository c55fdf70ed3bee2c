"""atomic_write: the target gets the whole new content or keeps the whole old one, and no temp file stays."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from phase2_architecture.src.atomic_files import atomic_write


def test_atomic_write_replaces_the_file_and_creates_missing_folders(tmp_path):
    target = tmp_path / "new" / "folder" / "data.bin"
    with atomic_write(target) as f:
        f.write(b"\x00\x01binary")
    assert target.read_bytes() == b"\x00\x01binary"
    with atomic_write(target, "w", encoding="utf-8") as f:
        f.write("texte réécrit")
    assert target.read_text(encoding="utf-8") == "texte réécrit"
    assert os.listdir(target.parent) == ["data.bin"]  # no temp file left behind


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_inside_the_block_keeps_the_old_file_and_removes_the_temp_file(tmp_path, error):
    target = tmp_path / "state.json"
    target.write_text("old, complete")
    with pytest.raises(type(error)):
        with atomic_write(target, "w", encoding="utf-8") as f:
            f.write("new, half writ")
            assert target.read_text() == "old, complete"  # nothing visible before the block ends
            raise error
    assert target.read_text() == "old, complete"
    assert os.listdir(tmp_path) == ["state.json"]


def test_only_write_modes_are_accepted(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'wb' or 'w'"):
        with atomic_write(tmp_path / "x", "a"):
            pass


def test_the_demo_script_shows_the_old_file_surviving_a_failed_write():
    script = Path(__file__).resolve().parents[1] / "src" / "atomic_files.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    assert "second write failed: No space left on device" in out
    assert 'after the failure:   state.json = {"step": 100}' in out
    assert "files in the folder: ['state.json']" in out
