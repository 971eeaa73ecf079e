"""Builds the CPU backend's library ahead of time (allmpnet/backends/cpu/build.py), so wheels carry it compiled and
need no compiler where they are installed. Everything else about the package is in pyproject.toml."""
import importlib.util
import platform
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

BUILD = Path(__file__).parent / "src" / "allmpnet" / "backends" / "cpu" / "build.py"


def load_build_module():
    # by path: importing the package would import torch, which the build environment need not have
    spec = importlib.util.spec_from_file_location("allmpnet_cpu_build", BUILD)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class CpuBackend(Extension):
    """The library, built by build.py (its own compiler calls, one set of flags per source), not by setuptools."""

    def __init__(self):
        super().__init__("allmpnet.backends.cpu._allmpnet_cpu", sources=[])


class BuildCpuBackend(build_ext):
    def get_ext_filename(self, fullname):
        # a plain shared library, loaded with ctypes: no Python ABI in its name (library.py finds _allmpnet_cpu*.so)
        if fullname.split(".")[-1] == CpuBackend().name.split(".")[-1]:  # called with the name's last part, or all
            return str(Path(*fullname.split("."))) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if not isinstance(ext, CpuBackend):
            return super().build_extension(ext)
        if platform.machine().lower() not in ("x86_64", "amd64"):
            print(f"allmpnet: no CPU backend for {platform.machine()} (our kernels are x86-64)")
            return
        build = load_build_module()
        try:
            build.build_library(self.get_ext_fullpath(ext.name))
        except build.BuildError as error:
            # a source install without a compiler still installs; the library is then built on first use where a
            # compiler appears, and until then allmpnet runs without our kernels and says so
            print(f"allmpnet: the CPU backend was not built ({error}); allmpnet will build it on first use where a "
                  "C/C++ compiler is found, and runs without its kernels until then", file=sys.stderr)


class PlatformWheel(bdist_wheel):
    """The library calls no Python API: one wheel per platform serves every Python 3."""

    def get_tag(self):
        return ("py3", "none", super().get_tag()[2])


setup(ext_modules=[CpuBackend()], cmdclass={"build_ext": BuildCpuBackend, "bdist_wheel": PlatformWheel})
