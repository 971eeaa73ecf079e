"""Crash-safe storage for an index directory: immutable version folders and an atomically swapped pointer.

    DIR/CURRENT        one line naming the live version, e.g. "v000003" (replaced with os.replace)
    DIR/v000003/       manifest.json + data files of that version; never modified once committed
    DIR/.staging-*/    a version being written; a killed writer leaves it behind and the next writer removes it
    DIR/.lock          flock-ed by writers so two builds never interleave

A writer fills a staging folder, fsyncs every file and the folder, renames it to the next version name, fsyncs
DIR, then swaps CURRENT. A kill at any point leaves CURRENT naming a complete version (the old or the new one).
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from allmpnet.errors import AllmpnetError

POINTER = "CURRENT"
POINTER_TMP = f"{POINTER}.tmp"
LOCK = ".lock"
STAGING_PREFIX = ".staging-"
VERSION_RE = re.compile(r"^v(\d{6,})$")


class IndexFormatError(AllmpnetError, ValueError):
    """The directory is not a readable allmpnet index (missing, corrupt, or written by something else)."""


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_index_dir(root: Path) -> bool:
    return (root / POINTER).is_file()


def writer_leftovers(root: Path) -> list[str]:
    """Names in root that only a writer makes (version folders, the pointer's temporary, staging folders, the lock)."""
    return sorted(p.name for p in root.iterdir()
                  if VERSION_RE.match(p.name) or p.name in (POINTER_TMP, LOCK) or p.name.startswith(STAGING_PREFIX))


def interrupted_first_build(root: Path) -> list[str]:
    """What a first build killed before its commit left in root (nothing else there, no CURRENT); [] otherwise.

    A killed first build never made anything readable: its folders can be cleared and the build run again.
    """
    if not root.is_dir() or (root / POINTER).exists():
        return []
    names = sorted(p.name for p in root.iterdir())
    leftovers = writer_leftovers(root)
    return [n for n in leftovers if n != LOCK] if names and names == leftovers else []


def current_version(root: Path) -> Path:
    """The folder of the live version; a clear IndexFormatError when there is none."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such index directory")
    if not root.is_dir():
        raise IndexFormatError(f"{root} is a file, not an index directory")
    pointer = root / POINTER
    if not pointer.is_file():
        leftovers = interrupted_first_build(root)
        if leftovers:
            raise IndexFormatError(
                f"{root} holds no index: its first build was interrupted before it committed (left "
                f"{', '.join(leftovers[:3])}{' …' if len(leftovers) > 3 else ''}, no {POINTER}). Run the build again, "
                f"`allmpnet index build CORPUS --out {root}`; it clears what the killed build left")
        raise IndexFormatError(f"{root} is not an allmpnet index (no {POINTER} file); build one with "
                               f"`allmpnet index build CORPUS --out {root}`")
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not VERSION_RE.match(name):
        raise IndexFormatError(f"{pointer} is corrupt: {name[:40]!r} is not a version name")
    version = root / name
    if not version.is_dir():
        raise IndexFormatError(f"{root} is corrupt: {POINTER} names {name}, which is missing")
    return version


@contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Exclusive lock for the duration of one build/add; a second writer fails at once instead of waiting."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexFormatError(f"{root} is being written by another process; try again when it finishes")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def new_staging(root: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))


def commit(root: Path, staging: Path) -> Path:
    """Make `staging` the live version. Caller holds writer_lock."""
    for f in staging.iterdir():
        fsync_path(f)
    fsync_path(staging)
    number = max([int(m.group(1)) for p in root.iterdir() if (m := VERSION_RE.match(p.name))], default=0) + 1
    version = root / f"v{number:06d}"
    os.rename(staging, version)
    fsync_path(root)
    pointer_tmp = root / POINTER_TMP
    with open(pointer_tmp, "w", encoding="utf-8") as f:
        f.write(version.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, root / POINTER)
    fsync_path(root)
    return version


def remove_stale(root: Path) -> None:
    """Delete versions other than the live one, leftover staging folders and pointer temporaries. Caller holds
    writer_lock.

    Readers that already opened an old version keep working: its files stay alive while they are open.
    """
    live = (root / POINTER).read_text().strip() if (root / POINTER).is_file() else None
    (root / POINTER_TMP).unlink(missing_ok=True)  # only ever written under the lock, then renamed: a kill's debris
    for p in root.iterdir():
        stale_version = VERSION_RE.match(p.name) and p.name != live
        if p.is_dir() and (stale_version or p.name.startswith(STAGING_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)
