"""The training loop of the all-* recipe: ours, from one CPU process to many GPUs under torchrun."""
from __future__ import annotations

import json
import resource
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from allmpnet.encode import Encoder
from allmpnet.encode.precision import plan_training_precision
from allmpnet.errors import InvalidInput
from allmpnet.train import checkpoint
from allmpnet.train.data import build_sampler
from allmpnet.train.distributed import broadcast_parameters, init_from_env, sum_gradients, sum_over_processes
from allmpnet.train.gradcache import forward_backward

Evaluator = Callable[[Encoder], dict]  # any callable: model in eval mode -> {metric: value}

# recipe values that must not change across --resume (the schedule and the batches depend on them)
RESUME_FIXED = ("data_config", "max_seq_length", "steps", "batch_size", "lr", "warmup_steps", "seed", "dedup_window", "shuffle_buffer")


@dataclass
class TrainConfig:
    data_config: str
    model: str
    out: str
    steps: int
    batch_size: int = 1024  # global: pairs per score matrix, split across processes
    lr: float = 2e-5
    adam_eps: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 500
    max_grad_norm: float = 1.0
    scale: float = 20.0
    max_seq_length: int = 128
    chunk_size: int | None = None  # GradCache chunk (texts per forward); None: plain step
    precision: str = "auto"  # autocast in the precision plan's dtype (auto: bf16 where the hardware has it)
    gradient_checkpointing: bool = False
    dedup_window: int = 3  # batches (the current one included) within which a repeated text skips its sample
    shuffle_buffer: int = 10_000
    skip_bad: bool = False
    seed: int = 42
    save_steps: int = 1000
    keep_checkpoints: int = 2
    eval_steps: int = 0
    eval_at_start: bool = False
    log_steps: int = 1
    save_max_seq_length: int | None = None  # max_seq_length the saved model lists; None: the starting model's
    device: str | None = None
    resume: bool = False
    progress: bool = True


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the base lr for update number `step` (0-based): linear warm-up, then linear decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux reports KiB)


def train(cfg: TrainConfig, evaluator: Evaluator | None = None) -> Path:
    """Run the recipe; returns the output directory, which holds the final model (sentence-transformers layout)."""
    if cfg.steps < 1:
        raise InvalidInput(f"steps must be positive, got {cfg.steps}")
    out = Path(cfg.out)
    device_type = torch.device(cfg.device).type if cfg.device else ("cuda" if torch.cuda.is_available() else "cpu")
    context = init_from_env(device_type)
    if cfg.batch_size % context.world_size:
        raise InvalidInput(f"batch size {cfg.batch_size} does not split evenly over {context.world_size} processes")
    local_batch = cfg.batch_size // context.world_size
    device = torch.device(cfg.device or (f"cuda:{context.local_rank}" if device_type == "cuda" else "cpu"))

    resume_from = checkpoint.latest_checkpoint(out) if cfg.resume and out.is_dir() else None
    if cfg.resume and resume_from is None and context.is_main:
        warnings.warn(f"--resume: no checkpoint under {out}; starting from {cfg.model}", stacklevel=2)
    # training truncates at 128 word pieces (the encoder's tokenizer, also used by the evaluation hook), but the
    # saved model keeps its inference limit (384 for the card's)
    model = Encoder(resume_from or cfg.model, device=device, precision=plan_training_precision(cfg.precision, device),
                    max_seq_length=cfg.max_seq_length)
    inference_max_length = cfg.save_max_seq_length or min(model.model.max_seq_length or model.model.max_positions,
                                                          model.model.max_positions)
    model.model.normalize = True  # the recipe trains normalized embeddings; the saved model lists Normalize
    model.model.network.enable_gradient_checkpointing(cfg.gradient_checkpointing)
    torch.manual_seed(cfg.seed + context.rank)
    broadcast_parameters(model.model, context)

    sampler = build_sampler(cfg.data_config, cfg.batch_size, seed=cfg.seed, dedup_window=cfg.dedup_window,
                            buffer_size=cfg.shuffle_buffer, skip_bad=cfg.skip_bad)
    params = [p for p in model.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    start = 0
    if resume_from is not None:
        state = checkpoint.load_training_state(resume_from, context, device)
        changed = [k for k in RESUME_FIXED if state["config"].get(k) != getattr(cfg, k)]
        if changed:
            saved = ", ".join(f"{k}={state['config'].get(k)!r}" for k in changed)
            raise InvalidInput(f"cannot resume {resume_from}: {', '.join(changed)} differ from the checkpoint's "
                               f"({saved})")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        start = state["step"]

    log_path = out / "train_log.jsonl"
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None and log_path.is_file():  # steps after the checkpoint are about to be redone
            kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= start]
            log_path.write_text("".join(line + "\n" for line in kept))
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    def log(record: dict) -> None:
        if context.is_main:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(step: int) -> None:
        if context.is_main:
            model.eval()
            with torch.no_grad():
                scores = evaluator(model)
            model.train()
            log({"step": step, "eval": scores})
            bar.write(f"step {step}: eval {json.dumps(scores)}")
        if context.enabled:
            torch.distributed.barrier()

    def training_state(step: int) -> dict:
        return {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(), "config": asdict(cfg)}

    bar = tqdm(total=cfg.steps, initial=start, desc="training", unit="step",
               disable=not (cfg.progress and context.is_main))
    if evaluator is not None and cfg.eval_at_start and start == 0:
        evaluate(0)
    model.train()
    window_examples = window_tokens = truncated = 0
    window_start = time.perf_counter()
    for step in range(start, cfg.steps):
        batch = sampler.next_batch()
        local = [column[context.rank * local_batch:(context.rank + 1) * local_batch] for column in batch.columns]
        tokenized = [model.tokenizer(column) for column in local]
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(model, [t.ids for t in tokenized], context, cfg.scale, cfg.chunk_size)
        sum_gradients(params, context)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()

        window_examples += batch.size
        window_tokens += sum(int(t.lengths.sum()) for t in tokenized)  # this process's share
        truncated += sum(sum(t.truncated) for t in tokenized)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if done % cfg.log_steps == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - window_start
            window_tokens = sum_over_processes(window_tokens, context)
            log({"step": done, "loss": round(loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
                 "dataset": sampler.datasets[batch.dataset].name,
                 "examples_per_s": round(window_examples / elapsed, 3),
                 "tokens_per_s": round(window_tokens / elapsed, 1), "memory_mb": round(memory_mb(device), 1),
                 "truncated_texts": int(sum_over_processes(truncated, context)),  # since (re)start
                 "skipped_duplicates": sum(sampler.skipped.values()), "bad_lines": sum(sampler.bad_lines.values())})
            window_examples = window_tokens = 0
            window_start = time.perf_counter()
        if cfg.save_steps and done % cfg.save_steps == 0 and done < cfg.steps:
            checkpoint.save_checkpoint(out, done, model, training_state(done), context, cfg.keep_checkpoints,
                                       inference_max_length)
        if evaluator is not None and cfg.eval_steps and done % cfg.eval_steps == 0:
            evaluate(done)
            window_start = time.perf_counter()  # throughput figures count training time only
    bar.close()

    checkpoint.save_checkpoint(out, cfg.steps, model, training_state(cfg.steps), context, cfg.keep_checkpoints,
                               inference_max_length)
    if context.is_main:
        checkpoint.save_model(model, out, inference_max_length)
        if sampler.bad_lines:
            warnings.warn(f"skipped bad lines: {sampler.bad_lines}", stacklevel=2)
    return out
