"""Checkpoints: the model in the sentence-transformers layout plus everything `--resume` needs to continue exactly.

out/checkpoint-0000100/  model files (loadable by Encoder and by sentence-transformers)
                          training_state.pt   step, optimizer, scheduler, sampler, config
                          rng-rank0.pt …       each process's random state (dropout masks)
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from allmpnet.encode import Encoder
from allmpnet.errors import InvalidInput
from allmpnet.train.distributed import Context

STATE_FILE = "training_state.pt"
PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step:07d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under out (a half-written one has no state file and is ignored)."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*")
             if (m := PATTERN.match(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _barrier(context: Context) -> None:
    if context.enabled:
        dist.barrier()


def save_model(model: Encoder, path: Path, max_seq_length: int | None = None) -> None:
    """The sentence-transformers layout, listing `max_seq_length` (the inference limit) instead of training's."""
    model.save(path, max_seq_length)


def save_checkpoint(out: Path, step: int, model: Encoder, training_state: dict, context: Context,
                    keep: int | None = None, max_seq_length: int | None = None) -> Path:
    """Write to a temporary folder, then rename: a crash mid-save never leaves a checkpoint that looks complete."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    if context.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(context)
    torch.save(rng_state(model.device), tmp / f"rng-rank{context.rank}.pt")
    _barrier(context)
    if context.is_main:
        save_model(model, tmp, max_seq_length)
        torch.save(training_state, tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep:
            # the checkpoint this run resumed from still supplies the tokenizer files: never prune it
            older = sorted(p for p in out.glob("checkpoint-*") if PATTERN.match(p.name) and p != final
                           and p.resolve() != model.model_dir.resolve())
            for stale in older[:max(0, len(older) - (keep - 1))]:
                shutil.rmtree(stale, ignore_errors=True)
    _barrier(context)
    return final


def load_training_state(path: Path, context: Context, device: torch.device) -> dict:
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    rng_file = path / f"rng-rank{context.rank}.pt"
    if not rng_file.is_file():
        raise InvalidInput(f"{path} was saved by fewer processes than this run has ({rng_file.name} missing); "
                           "resume with the same number of processes")
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False), device)
    return state
