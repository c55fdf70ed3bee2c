"""Write a file so that a crash never leaves half of it: temp file, flush + fsync, rename.

    with atomic_write("ckpt.pt") as f:          # binary by default; "w" + encoding for text
        torch.save(state, f)

The data goes to a temporary file in the target's folder. Only when the block finishes is it
flushed to disk (fsync) and renamed over the target with os.replace, which is atomic on POSIX and
Windows: a reader sees the old file or the new one, never a mix. If the block raises (an error,
Ctrl-C, a full disk), the target is untouched and the temporary file is removed.

Phase 2's checkpoints, Phase 3's tokenizer and token files, and the MoE project's checkpoints and
tokenizers all write through this one function.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Yield a file open for writing that replaces `path` atomically when the block succeeds."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + path.name + "-", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _demo() -> None:
    """Write a file, then fail half-way through rewriting it: the first version survives whole."""
    import tempfile as _tempfile

    with _tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "state.json"
        with atomic_write(target, "w", encoding="utf-8") as f:
            f.write('{"step": 100}')
        print(f"written:             {target.name} = {target.read_text()}")
        try:
            with atomic_write(target, "w", encoding="utf-8") as f:
                f.write('{"step": 2')  # half of the new version ...
                raise OSError("No space left on device")  # ... then the disk is full
        except OSError as err:
            print(f"second write failed: {err}")
        print(f"after the failure:   {target.name} = {target.read_text()} (the old version, whole)")
        print(f"files in the folder: {sorted(p.name for p in Path(folder).iterdir())} (no temp file left)")


if __name__ == "__main__":
    _demo()
