"""The CPU backend's compiled library: found, checked and declared in one place.

Where it comes from: `pip install` / `pip wheel` build it into this package (build.py, called by setup.py), so an
installed wheel needs no compiler. A source tree without it, or whose sources have changed since it was built,
builds it on first use into the cache (atomically, keyed by sources, flags and compilers). Where neither works (no
compiler, not x86-64), `library_unavailable()` says why, and every kernel reports itself unavailable.

Before anything calls it, the library's own account of its interface (`allmpnet_cpu_layout`: version, kernel ids,
constants, and the size and offset of every struct field Python fills) is compared with the ctypes mirrors below;
a library that differs is refused with what differs (`InterfaceMismatch`), never called with wrong layouts.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from pathlib import Path

import torch

from allmpnet.backends.cpu.build import BuildError, build_key, build_library, compilers, source_digest
from allmpnet.weights import cache_root

INTERFACE_VERSION = 1  # ALLMPNET_CPU_INTERFACE_VERSION in csrc/allmpnet_cpu.h
LIBRARY_STEM = "_allmpnet_cpu"  # the packaged library: _allmpnet_cpu<suffix>.so beside this module
MAX_SPLIT = 8  # ALLMPNET_MAX_SPLIT: entries a spiky row keeps aside
SPLIT_SHARE = 0.6  # ALLMPNET_SPLIT_SHARE
MAX_TEXT = 512  # ALLMPNET_MAX_TEXT: tokens of one text in the fused encoder
HEAD_DIM = 64  # ALLMPNET_HEAD_DIM: the x86 attention kernels' head size
# the kernel enum, by the names Python knows them by (int8.KERNELS, fused.FP32_KERNELS)
KERNEL_IDS = {"avx2-f32": 1, "avx2-a16": 2, "avx512-f32": 3, "avx512-a16": 4, "avx512-bf16": 5, "vnni-a16": 6,
              "vnni-a8": 7, "avx512-f32w": 8, "avx2-f32w": 9, "avxvnni-a8": 10, "vnni256-a8": 11, "amx-a8": 12}


class InterfaceMismatch(RuntimeError):
    """A library built from other sources than these mirrors describe."""


# ---------------------------------------------------------------- ctypes mirrors of allmpnet_cpu.h's structs

class LinearSpec(ctypes.Structure):  # x86_linear_spec
    _fields_ = [("kernel", ctypes.c_int32), ("gelu", ctypes.c_int32), ("large_kernel", ctypes.c_int32),
                ("small_rows", ctypes.c_int32), ("packed", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("compensation", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("smooth", ctypes.c_void_p),
                ("group", ctypes.c_int64), ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("route", ctypes.c_float)]


class EmbeddingSpec(ctypes.Structure):  # x86_embedding_spec
    _fields_ = [("word", ctypes.c_void_p), ("position", ctypes.c_void_p), ("bf16", ctypes.c_int64),
                ("vocab", ctypes.c_int64), ("positions", ctypes.c_int64), ("offset", ctypes.c_int64),
                ("pad_id", ctypes.c_int64), ("norm_weight", ctypes.c_void_p), ("norm_bias", ctypes.c_void_p)]


class LayerSpec(ctypes.Structure):  # x86_layer_spec
    _fields_ = [("qkv", LinearSpec), ("o", LinearSpec), ("up", LinearSpec), ("down", LinearSpec),
                ("norm1_weight", ctypes.c_void_p), ("norm1_bias", ctypes.c_void_p),
                ("norm2_weight", ctypes.c_void_p), ("norm2_bias", ctypes.c_void_p)]


MIRRORS = {"x86_linear_spec": LinearSpec, "x86_layer_spec": LayerSpec, "x86_embedding_spec": EmbeddingSpec}


def expected_layout() -> dict[str, str]:
    """What allmpnet_cpu_layout() must say for these mirrors and constants."""
    layout = {"version": str(INTERFACE_VERSION), "max_split": str(MAX_SPLIT), "split_share": f"{SPLIT_SHARE:g}",
              "max_text": str(MAX_TEXT), "head_dim": str(HEAD_DIM)}
    layout.update({f"kernel.{name}": str(ident) for name, ident in KERNEL_IDS.items()})
    for name, mirror in MIRRORS.items():
        layout[f"{name}.size"] = str(ctypes.sizeof(mirror))
        for field, _ in mirror._fields_:
            layout[f"{name}.{field}"] = str(getattr(mirror, field).offset)
    return layout


def read_layout(library: ctypes.CDLL) -> dict[str, str]:
    function = library.allmpnet_cpu_layout
    function.argtypes, function.restype = [], ctypes.c_char_p
    return dict(item.split("=", 1) for item in function().decode().split(";") if item)


def check_interface(library: ctypes.CDLL, path: Path | str = "the library") -> None:
    """InterfaceMismatch unless the library's layout is exactly the one these mirrors expect."""
    try:
        got = read_layout(library)
    except AttributeError:
        raise InterfaceMismatch(f"{path} is no allmpnet CPU backend (it has no allmpnet_cpu_layout)") from None
    want = expected_layout()
    differs = [f"{key}: library {got.get(key, 'missing')}, Python {value}" for key, value in want.items()
               if got.get(key) != value]
    if differs:
        raise InterfaceMismatch(f"{path} was built from other sources than this allmpnet ({'; '.join(differs[:6])}"
                                f"{'; ...' if len(differs) > 6 else ''}): reinstall allmpnet")


# ---------------------------------------------------------------- finding, building, loading

def packaged_library() -> Path | None:
    """The library pip built into this package, if any."""
    found = sorted(Path(__file__).parent.glob(f"{LIBRARY_STEM}*.so"))
    return found[0] if found else None


def cached_library() -> Path:
    """The library built from these sources into the cache (built now if it is not there)."""
    cc, cxx = compilers()
    target = cache_root() / "kernels" / f"{LIBRARY_STEM}-{build_key(cc, cxx)}.so"
    if not target.is_file():
        build_library(target)
    return target


def library_path() -> Path:
    """The packaged library where it was built from these sources, else the cache's."""
    packaged = packaged_library()
    if packaged is not None:
        library = ctypes.CDLL(str(packaged))
        if read_layout(library).get("sources") in (None, source_digest()):
            return packaged
    return cached_library()


_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.uname().machine not in ("x86_64", "AMD64"):
        return None, f"not an x86-64 CPU ({os.uname().machine})"
    with _lock:
        try:
            path = library_path()
        except (BuildError, OSError) as error:
            return None, f"the CPU backend's library is not built and cannot be here ({error})"
        library = ctypes.CDLL(str(path))
    check_interface(library, path)
    _declare(library)
    return library, ""


def load() -> ctypes.CDLL:
    """The checked library; RuntimeError saying why where there is none."""
    library, why = _load()
    if library is None:
        raise RuntimeError(why)
    return library


def library_unavailable() -> str:
    """Why there is no library here ("" when there is)."""
    return _load()[1]


def _declare(library: ctypes.CDLL) -> None:
    pointer, i64, c_int, c_float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {
        "allmpnet_x86_kernel_supported": ([c_int], c_int),
        "allmpnet_x86_scratch_bytes": ([c_int, i64, i64, c_int], i64),
        "allmpnet_x86_linear": ([c_int, pointer, c_int, pointer, pointer, pointer, pointer, i64, pointer, pointer,
                                 pointer, c_int, i64, i64, i64, c_int, c_float, pointer, c_int], i64),
        "allmpnet_x86_attention_scratch_bytes": ([i64, c_int], i64),
        "allmpnet_x86_attention": ([pointer, c_int, pointer, pointer, c_float, i64, i64, i64, i64, c_int, pointer,
                                    c_int], i64),
        "allmpnet_x86_layer_norm": ([pointer, pointer, pointer, pointer, c_float, i64, i64, c_int], i64),
        "allmpnet_x86_encoder_scratch_bytes": ([i64, i64, i64, i64, c_int], i64),
        "allmpnet_x86_encoder": ([pointer, i64, pointer, pointer, pointer, i64, i64, i64, i64, pointer, pointer,
                                  pointer, i64, c_float, c_int, c_int, pointer, c_int, pointer, pointer, c_int], i64),
        "allmpnet_amx_bf16_linear": ([pointer, pointer, pointer, i64, pointer, pointer, pointer, i64, i64, i64,
                                      c_int, c_int], c_int),
        "allmpnet_amx_short_attention": ([pointer, pointer, pointer, c_float, i64, i64, i64, i64, i64, c_int],
                                         c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, restype


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux; empty elsewhere, which keeps callers on the portable paths)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


_scratch = threading.local()  # per Python thread: concurrent calls never share a buffer


def scratch_buffer(size: int) -> torch.Tensor:
    """At least `size` bytes of this thread's scratch (kept and grown, never shrunk), 64-byte aligned."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < size:
        buffer = _scratch.buffer = torch.empty(max(size, 1 << 20), dtype=torch.uint8)
    return buffer
