"""Building the CPU backend's library: every source file in csrc/ compiled with its own instruction-set flags, then
linked into one shared library that loads on any x86-64 CPU (the dispatch in linear.c, attention.c and encoder.c
calls a file's code only where the CPU runs its instructions).

`pip install` / `pip wheel` build it ahead of time into the package (setup.py calls `build_library`), so a
wheel carries it and needs no compiler where it is installed. A source tree without it (an editable checkout
whose build was skipped) builds it on first use into the cache, keyed by the sources, flags and compilers
(library.py).

    python -m allmpnet.backends.cpu.build OUT.so [--werror]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")

# -fno-gcse -fno-tree-pre: without them GCC 12 stored the micro-kernels' 24 sums to the stack on every step (2.5x
# slower int8 kernel). -ffp-contract=fast is GNU C's default, stated so the C++ files contract as the C ones do.
COMMON = ["-O3", "-fPIC", "-fopenmp", "-fno-math-errno", "-ffp-contract=fast", "-fno-gcse", "-fno-tree-pre",
          "-fvisibility=hidden"]
C_FLAGS = ["-std=gnu11"]
CXX_FLAGS = ["-std=gnu++17", "-fno-exceptions", "-fno-rtti"]
# -Wno-(maybe-)uninitialized: GCC 12 flags its own AVX-512 headers (the _mm512_undefined_* inside broadcasts and
# extracts, once inlined into C++)
WARNINGS = ["-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
            "-Wno-maybe-uninitialized", "-Wno-uninitialized"]

AVX2 = ["-mavx2", "-mfma"]
AVX512 = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
AVX512_BF16 = AVX512 + ["-mavx512bf16"]
AVX512_VNNI = AVX512 + ["-mavx512vnni"]
AMX_INT8 = AVX512_VNNI + ["-mamx-tile", "-mamx-int8"]
AMX_BF16 = AVX512_BF16 + ["-mamx-tile", "-mamx-bf16"]


@dataclass(frozen=True)
class Source:
    name: str
    isa: tuple[str, ...] = ()  # instruction-set flags; none: code for any x86-64 (the dispatch)
    needs: str = ""  # a compiler feature it needs ("amx", "avxvnni"): left out, and its kernels off, without it


SOURCES = (
    Source("interface.c"), Source("linear.c"), Source("attention.c"), Source("layer_norm.c"), Source("encoder.c"),
    Source("linear_avx2.cpp", tuple(AVX2)), Source("encoder_avx2.c", tuple(AVX2)),
    Source("linear_avx512.cpp", tuple(AVX512)), Source("attention_avx512.c", tuple(AVX512)),
    Source("linear_avx512_bf16.cpp", tuple(AVX512_BF16)), Source("attention_bf16.c", tuple(AVX512_BF16)),
    Source("layer_norm_bf16.c", tuple(AVX512_BF16)),
    Source("linear_vnni.cpp", tuple(AVX512_VNNI)),
    Source("linear_avxvnni.cpp", tuple(AVX2 + ["-mavxvnni"]), needs="avxvnni"),
    Source("linear_amx.cpp", tuple(AMX_INT8), needs="amx"),
    Source("attention_amx.c", tuple(AMX_BF16), needs="amx"),
    Source("amx_bf16.c", tuple(AMX_BF16), needs="amx"),
)
FEATURE_FLAGS = {"amx": ["-mamx-tile", "-mamx-int8", "-mamx-bf16"], "avxvnni": ["-mavxvnni"]}


class BuildError(RuntimeError):
    """The library could not be built here (no compiler, or it refused the sources)."""


def compilers() -> tuple[str, str]:
    """(C compiler, C++ compiler): $CC / $CXX, else cc / c++ (gcc / g++) on PATH."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cc or not cxx:
        raise BuildError("no C and C++ compiler on PATH (cc/gcc and c++/g++; or set CC and CXX)")
    return cc, cxx


def _version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"compiler {compiler} does not run: {e}") from None


def supported_features(cc: str, cxx: str) -> frozenset[str]:
    """The optional instruction sets (FEATURE_FLAGS) both compilers take."""
    found = set()
    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / "probe.c"
        probe.write_text("int main(void) { return 0; }\n")
        for feature, flags in FEATURE_FLAGS.items():
            ok = all(subprocess.run([compiler, *flags, "-x", "c", "-c", str(probe), "-o", os.devnull],
                                    capture_output=True).returncode == 0 for compiler in (cc, cxx))
            if ok:
                found.add(feature)
    return frozenset(found)


def source_digest() -> str:
    """A digest of the sources (csrc/): the library records the one it was built from (allmpnet_cpu_layout)."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def build_key(cc: str, cxx: str, werror: bool = False) -> str:
    """What a built library depends on: the sources, the flags and the compilers (their versions)."""
    digest = hashlib.sha256(source_digest().encode())
    digest.update(repr((COMMON, C_FLAGS, CXX_FLAGS, SOURCES, werror)).encode())
    digest.update((_version(cc) + _version(cxx)).encode())
    return digest.hexdigest()[:16]


def build_library(out: str | os.PathLike, werror: bool = False, jobs: int | None = None) -> Path:
    """Compile every source with its flags and link them into `out` (written atomically); BuildError when the
    compilers are missing or refuse. werror: warnings are errors (the tests build it so)."""
    cc, cxx = compilers()
    features = supported_features(cc, cxx)
    defines = [f"-DALLMPNET_HAVE_AMX={int('amx' in features)}", f"-DALLMPNET_HAVE_AVXVNNI={int('avxvnni' in features)}",
               f'-DALLMPNET_SOURCE_DIGEST="{source_digest()}"']
    extra = WARNINGS + (["-Werror"] if werror else [])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        def compile_one(source: Source) -> Path:
            cxx_source = source.name.endswith(".cpp")
            obj = Path(scratch) / (source.name + ".o")
            command = [cxx if cxx_source else cc, *COMMON, *(CXX_FLAGS if cxx_source else C_FLAGS), *extra,
                       *defines, *source.isa, f"-I{CSRC}", "-c", str(CSRC / source.name), "-o", str(obj)]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode != 0:
                raise BuildError(f"compiling {source.name} failed: {run.stderr.strip()[-2000:]}")
            return obj
        chosen = [s for s in SOURCES if not s.needs or s.needs in features]
        with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
            objects = list(pool.map(compile_one, chosen))
        built = Path(scratch) / out.name
        link = [cxx, "-shared", "-fopenmp", "-Wl,--as-needed", *map(str, objects), "-o", str(built)]
        run = subprocess.run(link, capture_output=True, text=True)
        if run.returncode != 0:
            raise BuildError(f"linking the CPU backend failed: {run.stderr.strip()[-2000:]}")
        os.replace(built, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Build allmpnet's CPU backend library.")
    parser.add_argument("out", help="the shared library to write")
    parser.add_argument("--werror", action="store_true", help="treat compiler warnings as errors")
    args = parser.parse_args()
    try:
        print(build_library(args.out, werror=args.werror))
    except BuildError as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()
