"""The CPU backend's library as a built component: every source builds with warnings as errors, the loader checks
the library's own account of its interface and refuses one that differs, a wheel carries the library and runs the
same plan with no compiler in reach, and where no library can be had, `auto` says what was lost."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from allmpnet.backends.cpu import build, library

ROOT = Path(__file__).resolve().parents[1]
needs_compiler = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")) or not shutil.which("c++"),
                                    reason="no C/C++ compiler on PATH")
x86 = pytest.mark.skipif(os.uname().machine != "x86_64", reason="the CPU backend is x86-64's")


@x86
def test_the_loaded_library_states_the_interface_python_expects():
    assert library.library_unavailable() == ""
    got = library.read_layout(library.load())
    for key, value in library.expected_layout().items():
        assert got[key] == value, key
    assert ctypes.sizeof(library.LinearSpec) == int(got["x86_linear_spec.size"])
    assert {f"kernel.{name}" for name in library.KERNEL_IDS} <= set(got)


def fake_library(tmp_path: Path, layout: str | None) -> ctypes.CDLL:
    """A shared library that states `layout` (or has no layout function at all); a file of its own each (the
    dynamic loader hands out a path it has already loaded as it was)."""
    stem = f"fake{len(list(tmp_path.glob('fake*.so')))}"
    source = tmp_path / f"{stem}.c"
    body = "int nothing(void) { return 0; }\n" if layout is None else (
        f'const char *allmpnet_cpu_layout(void) {{ return "{layout}"; }}\n')
    source.write_text(body)
    out = tmp_path / f"{stem}.so"
    subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", str(source), "-o", str(out)], check=True)
    return ctypes.CDLL(str(out))


@needs_compiler
def test_a_library_of_another_layout_is_refused_naming_what_differs(tmp_path):
    want = library.expected_layout()
    shifted = dict(want, **{"x86_linear_spec.route": str(int(want["x86_linear_spec.route"]) + 4)})
    text = ";".join(f"{k}={v}" for k, v in shifted.items())
    with pytest.raises(library.InterfaceMismatch, match=r"x86_linear_spec\.route: library \d+, Python \d+"):
        library.check_interface(fake_library(tmp_path, text), "fake.so")
    old = ";".join(f"{k}={v}" for k, v in dict(want, version="0").items())
    with pytest.raises(library.InterfaceMismatch, match="version: library 0"):
        library.check_interface(fake_library(tmp_path, old), "fake.so")
    with pytest.raises(library.InterfaceMismatch, match="no allmpnet CPU backend"):
        library.check_interface(fake_library(tmp_path, None), "fake.so")
    library.check_interface(fake_library(tmp_path, ";".join(f"{k}={v}" for k, v in want.items())))  # the same: ok


@x86
@needs_compiler
def test_every_source_builds_with_warnings_as_errors(tmp_path):
    out = build.build_library(tmp_path / "strict.so", werror=True)
    built = ctypes.CDLL(str(out))
    library.check_interface(built, out)
    assert library.read_layout(built)["sources"] == build.source_digest()


@x86
@needs_compiler
def test_a_wheel_carries_the_library_and_runs_the_same_plan_with_no_compiler(tmp_path, tiny_model_dir):
    # the wheel pip builds from this tree: a platform wheel, the library inside
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheels")], check=True, cwd=tmp_path, capture_output=True)
    wheel = next((tmp_path / "wheels").glob("allmpnet-*.whl"))
    assert wheel.name.endswith("-py3-none-linux_x86_64.whl"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        assert "allmpnet/backends/cpu/_allmpnet_cpu.so" in archive.namelist()
        archive.extractall(tmp_path / "site")
    # installed (unpacked) in place of this tree's package, with no compiler on PATH and an empty cache
    no_compiler = tmp_path / "bin"
    no_compiler.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "PATH": str(no_compiler), "CC": "/nonexistent/cc",
           "CXX": "/nonexistent/c++", "ALLMPNET_HOME": str(tmp_path / "home")}
    code = ("import allmpnet, sys; from allmpnet.encode.precision import plan_precision; "
            "print(allmpnet.__file__); print(plan_precision('auto', 'cpu').describe())")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    where, plan = run.stdout.splitlines()[:2]
    assert where.startswith(str(tmp_path / "site"))
    from allmpnet.encode.precision import plan_precision
    assert plan == plan_precision("auto", "cpu").describe()


def test_without_a_library_auto_says_what_it_lost(monkeypatch, tmp_path):
    # a source install with no compiler: no library beside the package, none to build into the cache
    from allmpnet.backends.cpu import amx, attention, fused, int8, layer_norm
    from allmpnet.encode import precision
    monkeypatch.setattr(library, "packaged_library", lambda: None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("ALLMPNET_HOME", str(tmp_path))
    caches = [library._load, int8.kernel_unavailable, fused.fp32_kernel_unavailable, attention.attention_unavailable,
              layer_norm.layer_norm_unavailable, amx.kernels_unavailable, precision._detect, precision.warn_unavailable]
    for cache in caches:
        cache.cache_clear()
    try:
        assert "not built" in library.library_unavailable()
        assert int8.kernel_unavailable("avx2-a16") == library.library_unavailable()
        with pytest.warns(RuntimeWarning, match="without allmpnet's CPU kernels") as caught:
            plan = precision.plan_precision("auto", "cpu")
            precision.plan_precision("auto", "cpu")  # once per process, not per plan
        assert len(caught) == 1 and "pip install" in str(caught[0].message)
        assert plan.linear != "int8-x86" and "without allmpnet's CPU kernels" in plan.reason
    finally:
        for cache in caches:
            cache.cache_clear()


def test_an_fp32_or_bf16_encoder_does_not_self_test_int8_kernels(tiny_model_dir):
    # a fresh process: the int8 kernels each precision's Encoder self-tests while it starts and answers a query
    probe = f"""
import json
from allmpnet import Encoder
from allmpnet.backends.cpu import int8
tested, self_test = [], int8._self_test
int8._self_test = lambda name: tested.append(name) or self_test(name)
report = {{}}
for precision in ("fp32", "bf16", "auto"):
    Encoder({str(tiny_model_dir)!r}, device="cpu", precision=precision).encode("a query")
    report[precision], tested[:] = list(tested), []
print(json.dumps(report))
"""
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    tested = json.loads(run.stdout.strip().splitlines()[-1])
    assert tested["fp32"] == [] and tested["bf16"] == []
    if os.uname().machine == "x86_64" and "avx2" in library.cpu_flags():
        assert tested["auto"]  # auto does: it chooses among them
