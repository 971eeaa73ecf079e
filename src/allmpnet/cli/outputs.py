"""Output files of the CLI: checked before any work, written whole or not at all, at exactly the path given."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def check_output_path(path: Path, example: str = "vectors.npy") -> None:
    """A clear error, naming the path, when nothing can be written there (checked before the work starts)."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name, e.g. {path / example}")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{path}: permission denied (the file exists and is not writable)")


@contextmanager
def replaced_on_success(path: Path, example: str = "vectors.npy") -> Iterator[IO[bytes]]:
    """A binary file to fill; it replaces `path` when the block ends without error and is removed otherwise.

    The file is created at once in path's folder, so an unwritable destination fails before any work is done,
    and a crash or kill midway leaves the previous file (if any) whole rather than half written.
    """
    path = Path(path)
    check_output_path(path, example)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".partial", delete=False)
    except OSError as e:
        raise PermissionError(f"{path}: cannot write there ({e.strerror or e})") from None
    try:
        with handle:
            yield handle
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
