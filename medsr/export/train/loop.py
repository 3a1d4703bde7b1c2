"""The one training loop of medsr-train: AdamW, warmup + cosine learning rate, gradient clipping, EMA, mixed
precision on CUDA, checkpoints every N steps, exact resume, JSON-lines metrics and a tqdm bar with the loss.

Exact resume without saving random states: everything random in step k (the batch, the noise, the timesteps)
is drawn from generators seeded by ``(seed, k)`` (`step_rng`), and the learning rate is a function of k, so a
run resumed from the checkpoint of step k repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsr.errors import CheckpointError, InputError
from medsr.export.train.checkpoint import CHECKPOINT_DIR, load_checkpoint, save_checkpoint

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings shared by the VAE and the denoiser.

    Attributes:
        steps: optimizer steps in all.
        batch_size: images (or latents) per step.
        lr: peak AdamW learning rate, reached after ``warmup_steps`` (linear), then cosine to ``min_lr``.
        weight_decay: AdamW decoupled weight decay (the paper: 0.01).
        grad_clip: max global gradient L2 norm (the paper: 1.0); 0 disables clipping.
        ema_decay: EMA of the parameters, ema = d * ema + (1 - d) * param after every step; 0 disables it.
        checkpoint_every: steps between checkpoints (one is always written at the end).
        log_every: steps between metrics lines.
        seed: the seed of the initial weights and of every step's random draws.
    """

    steps: int
    batch_size: int
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 42

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def learning_rate(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): linear warmup, then cosine from ``lr`` to ``min_lr``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def step_rng(seed: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The NumPy and torch generators of one step, functions of ``(seed, step)`` only (exact resume)."""
    rng = np.random.default_rng([seed, step])
    return rng, torch.Generator().manual_seed(int(rng.integers(2**63)))


def pick_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; ``"cuda"`` without a GPU is an InputError."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch sees no CUDA GPU")
    return torch.device(device)


# loss_fn(step, numpy rng, torch generator) -> (scalar loss tensor, extra metrics as floats)
LossFn = Callable[[int, np.random.Generator, torch.Generator], tuple[torch.Tensor, dict]]


def train(
    run_dir: Path,
    model: torch.nn.Module,
    loss_fn: LossFn,
    config: LoopConfig,
    state_extra: dict,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Optimise ``model``'s trainable parameters on ``loss_fn`` for ``config.steps`` steps; return the final EMA
    weights (or the raw weights when EMA is off) as a state dict on the CPU.

    ``state_extra`` (JSON-able: task, preset, data, ...) is stored with every checkpoint; resuming refuses a
    checkpoint whose ``config`` or ``state_extra`` differ from this call's, naming the first differing key.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    ema = {name: p.detach().clone() for name, p in params.items()} if config.ema_decay > 0 else None
    state = {"config": dataclasses.asdict(config), **state_extra}
    start = 0
    if resume:
        saved = load_checkpoint(run_dir, model, ema, optimizer)
        _check_same(run_dir, saved, state)
        start = saved["step"]
    elif (run_dir / CHECKPOINT_DIR).exists():
        raise CheckpointError(f"{run_dir}: already holds a checkpoint; pass --resume to continue it")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _no_autocast()
    from tqdm import tqdm

    step, saved_step, updating = start, start, False
    bar = tqdm(total=config.steps, initial=start, desc=state_extra.get("task", "train"), disable=not progress)
    try:
        with (run_dir / METRICS_FILE).open("a") as metrics:
            started = time.perf_counter()
            while step < config.steps:
                lr = config.learning_rate(step)
                rng, generator = step_rng(config.seed, step)
                with autocast:
                    loss, extra = loss_fn(step, rng, generator)
                updating = True  # an interrupt from here to the end of the update must not be checkpointed
                grad_norm = _update(loss, params, optimizer, ema, config, lr)
                step, updating = step + 1, False
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise CheckpointError(f"{run_dir}: loss became {value} at step {step}; last checkpoint kept")
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
                if step % config.log_every == 0 or step == config.steps:
                    line = {"step": step, "loss": value, "lr": lr, "grad_norm": grad_norm, **extra}
                    metrics.write(json.dumps({**line, "seconds": round(time.perf_counter() - started, 3)}) + "\n")
                    metrics.flush()
                if step % config.checkpoint_every == 0 or step == config.steps:
                    save_checkpoint(run_dir, model, ema, optimizer, {**state, "step": step})
                    saved_step = step
    except KeyboardInterrupt:
        if step > saved_step and not updating:  # the steps done since the last checkpoint are complete: keep them
            save_checkpoint(run_dir, model, ema, optimizer, {**state, "step": step})
        raise
    finally:
        bar.close()
    weights = {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
    if ema is not None:
        weights.update({name: value.cpu().clone() for name, value in ema.items()})
    return weights


def _update(loss: torch.Tensor, params: dict, optimizer, ema: dict | None, config: LoopConfig, lr: float) -> float:
    """Backward, clip, one AdamW step at ``lr``, EMA update; returns the gradient norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = _clip(params.values(), config.grad_clip)
    optimizer.step()
    if ema is not None:
        _update_ema(ema, params, config.ema_decay)
    return grad_norm


def _check_same(run_dir: Path, saved: dict, state: dict) -> None:
    for key, value in state.items():
        if saved.get(key) != json.loads(json.dumps(value)):
            raise CheckpointError(
                f"{run_dir}: checkpoint was made with a different {key!r} ({saved.get(key)!r}, now {value!r}); "
                "resume with the same options or start a new run directory"
            )


def _clip(params, max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


@torch.no_grad()
def _update_ema(ema: dict, params: dict, decay: float) -> None:
    for name, param in params.items():
        ema[name].lerp_(param.detach(), 1.0 - decay)


class _no_autocast:
    """A do-nothing context manager (CPU training runs in float32)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
