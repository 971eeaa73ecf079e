"""Every instruction-set level this CPU can stand in for (ALLMPNET_MAX_ISA / ONEDNN_MAX_CPU_ISA cap it, as on a user's
AVX2 laptop or a Cascade Lake server): `auto` plans that level's kernels, encodes within the quality contract of
exact fp32, and gives a text the same bits alone and in a batch. Each level runs in a process of its own (the
capabilities are read once per process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from allmpnet.backends.cpu.library import cpu_flags
from allmpnet.encode.precision import ISA_LEVELS

# the level's kernel for auto's int8 (None: the level has none and auto is bf16 or fp32), and its activations
FLAGS = frozenset(cpu_flags())
EXPECTED = {
    "avx2": ("avx2-a16", "float32"),
    "avx2_vnni": ("avxvnni-a8", "float32"),
    # AVX-VNNI sits below AVX-512 among the levels: a CPU that has it keeps it here, and W8A8 beats int16
    "avx512_core": ("avxvnni-a8" if "avx_vnni" in FLAGS else "avx512-a16", "bfloat16"),
    "avx512_core_vnni": ("vnni-a8", "bfloat16"),
    "avx512_core_bf16": ("vnni-a8", "bfloat16"),
    "avx512_core_amx": ("vnni-a8", "bfloat16"),
}
ONEDNN = {level: level.upper() for level in ISA_LEVELS}  # oneDNN's own names for the same levels

SCRIPT = r"""
import json, sys, warnings
import numpy as np
from allmpnet import Encoder
warnings.simplefilter("ignore")
model = sys.argv[1]
texts = ["the cat sat on the mat", "a dog and a car", "this is a test sentence with a few more words in it", "sun",
         " ".join(["search for the plant and the moon"] * 5)]
auto = Encoder(model, device="cpu", precision="auto")
exact = auto.with_precision("fp32")
together = auto.encode(texts + [f"filler {i} about a cat" for i in range(40)], batch_size=64)[:len(texts)]
alone = np.stack([auto.encode(t) for t in texts])
reference = exact.encode(texts)
plan = auto.plan
print(json.dumps({"name": plan.name, "kernel": plan.int8_kernel, "dtype": str(plan.dtype).split(".")[-1],
                  "min_cosine": float((alone * reference).sum(1).min()),
                  "same_bits": bool(np.array_equal(alone, together)), "reason": plan.reason}))
"""


def levels() -> list:
    params = []
    for level, needs in ISA_LEVELS.items():
        present = bool(needs & FLAGS) if level != "avx2" else {"avx2", "fma"} <= FLAGS
        params.append(pytest.param(level, marks=pytest.mark.skipif(not present,
                                                                    reason=f"this CPU has no {level}")))
    return params


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("isa-home")  # each level's int8 calibration, beside the others'


@pytest.mark.parametrize("level", levels())
def test_auto_at_each_instruction_set_level(level, tiny_model_dir, home):
    env = {**os.environ, "ALLMPNET_MAX_ISA": level, "ONEDNN_MAX_CPU_ISA": ONEDNN[level],
           "MKL_ENABLE_INSTRUCTIONS": "AVX2" if level.startswith("avx2") else "AVX512", "ALLMPNET_HOME": str(home)}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    kernel, dtype = EXPECTED[level]
    if level == "avx2_vnni" and "avxvnni" in got["reason"].lower() and got["kernel"] is None:
        pytest.skip("this build's compiler left out AVX-VNNI")
    assert (got["name"], got["kernel"], got["dtype"]) == ("int8", kernel, dtype), got
    assert got["min_cosine"] > 0.999, got
    assert got["same_bits"], got
