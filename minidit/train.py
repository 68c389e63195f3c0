"""Training: one Trainer for every model of the course — AdamW, warm-up, cosine decay, EMA, gradient clipping, bf16
autocast, checkpoint/resume, torchrun DDP — with four objectives: rectified flow, DDPM, VAE, classifier.

Randomness is a pure function of (seed, step): the batch indices, the objective's draws (t, noise, augmentation)
and the label-dropout mask of step s come from a generator seeded with (seed, s). So a run stopped after step s
and resumed from its checkpoint replays exactly the batches the uninterrupted run would have seen, and N DDP
processes each take their slice of the very same global batch a single process would use.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from minidit.checkpoint import CheckpointError, build_config, load_checkpoint, load_state, save_checkpoint
from minidit.ddpm import PREDICTIONS, DDPMSchedule, ddpm_loss
from minidit.flow import flow_loss, sample_t
from minidit.guidance import drop_labels
from minidit.metrics import random_affine
from minidit.vae import vae_loss

OBJECTIVES = ("flow", "ddpm", "vae", "classifier")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Optimisation and objective settings (saved with every training checkpoint)."""

    steps: int = 1000
    batch_size: int = 128  # global batch (split evenly across DDP processes)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine": decay to lr_min_ratio·lr by the end (steps or time budget)
    lr_min_ratio: float = 0.1
    time_budget: float | None = None  # stop after this many seconds of training; the schedule then follows time
    ema_decay: float = 0.999  # 0: the "EMA" is the model itself
    grad_clip: float | None = 1.0
    objective: str = "flow"  # one of OBJECTIVES
    label_dropout: float = 0.1  # flow/ddpm: labels replaced by the null label, for classifier-free guidance
    t_sampling: str = "logit_normal"  # flow: "uniform" or "logit_normal"
    t_mean: float = 0.0
    t_std: float = 1.0
    t_shift: float = 1.0
    ddpm_schedule: str = "linear"
    ddpm_prediction: str = "eps"  # ddpm: the network predicts "eps" (ε, DDPM/DiT) or "v" (Salimans & Ho 2022)
    min_snr_gamma: float | None = None  # ddpm: min-SNR-γ loss weighting (Hang et al. 2023, γ = 5); None: unweighted
    label_smoothing: float = 0.05  # classifier
    bf16: bool | str = False  # autocast matmuls to bfloat16; "auto": where the device has bf16 matmul units
    grad_checkpointing: bool = False
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode ("reduce-overhead": CUDA graphs)
    seed: int = 0
    log_every: int = 10
    extra: dict = field(default_factory=dict)  # free-form notes stored with checkpoints

    def __post_init__(self):
        bad = [name for name, ok in {
            "steps": self.steps >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0, "warmup_steps": self.warmup_steps >= 0,
            "lr_schedule": self.lr_schedule in ("constant", "cosine"), "lr_min_ratio": 0 <= self.lr_min_ratio <= 1,
            "time_budget": self.time_budget is None or self.time_budget > 0, "ema_decay": 0 <= self.ema_decay < 1,
            "grad_clip": self.grad_clip is None or self.grad_clip > 0, "objective": self.objective in OBJECTIVES,
            "label_dropout": 0 <= self.label_dropout < 1, "t_sampling": self.t_sampling in ("uniform", "logit_normal"),
            "t_std": self.t_std > 0, "t_shift": self.t_shift > 0,
            "ddpm_schedule": self.ddpm_schedule in ("linear", "cosine"),
            "ddpm_prediction": self.ddpm_prediction in PREDICTIONS,
            "min_snr_gamma": self.min_snr_gamma is None or self.min_snr_gamma > 0,
            "bf16": self.bf16 in (True, False, "auto"), "compile_mode": self.compile_mode in COMPILE_MODES,
        }.items() if not ok]
        if bad:
            raise ValueError("invalid TrainConfig: " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))


def ddp_env() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, else torchrun's environment, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: a GPU that supports bf16, or a CPU with AVX-512-BF16
    or AMX. Elsewhere bf16 autocast is emulated and slower than fp32 (`TrainConfig(bf16="auto")` then stays fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPU-feature probes
    return device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in probes)


class Trainer:
    """Owns the model, its EMA copy, the optimizer and the step counter for one training run."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
                 config: TrainConfig, device: torch.device | str | None = None):
        labels = torch.zeros(images.shape[0], dtype=torch.long) if labels is None else labels
        if images.ndim != 4 or labels.shape != (images.shape[0],) or not torch.isfinite(images).all():
            raise ValueError(f"need finite images (N, C, H, W) and labels (N,), got {tuple(images.shape)}, "
                             f"{tuple(labels.shape)}")
        self.cfg = c = config
        self.device = torch.device(device) if device is not None else images.device
        self.bf16 = native_bf16(self.device) if c.bf16 == "auto" else bool(c.bf16)  # what autocast does
        self.rank, self.world = ddp_env()
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        if c.batch_size % self.world or images.shape[0] < c.batch_size:
            raise ValueError(f"batch_size {c.batch_size} must divide among {self.world} processes and be at most "
                             f"the dataset's {images.shape[0]} images")
        self.images, self.labels = images.to(self.device), labels.to(self.device).long()
        self.model = model.to(self.device).train()
        self.model.grad_checkpointing = c.grad_checkpointing
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        # the fused kernel updates all parameters in one call instead of a Python loop over tensors (CPU and CUDA)
        fused = all(p.device.type in ("cpu", "cuda") for p in self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay, fused=fused or None)
        self.schedule = DDPMSchedule(c.ddpm_schedule) if c.objective == "ddpm" else None
        self.net = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if c.compile:
            self.net = torch.compile(self.net, mode=c.compile_mode)
        self.step, self.train_seconds = 0, 0.0
        self.history: list[dict] = []  # {step, loss, lr, seconds}
        # On a GPU the next step's batch (CPU generator: noise, t, indices) is drawn by a helper thread while the GPU
        # runs this step; on the CPU that thread would only take cores from the model, so batches are drawn inline.
        self.pool = ThreadPoolExecutor(max_workers=1) if self.device.type == "cuda" else None
        self.next_batch: tuple[int, Future] | None = None  # (step, its host batch being drawn)

    # ---- data and randomness: a pure function of (seed, step) -------------------------------------------
    def host_batch(self, step: int) -> dict[str, torch.Tensor]:
        """This process's slice of global batch `step` on the CPU: indices and the objective's random draws."""
        c, N, B = self.cfg, self.images.shape[0], self.cfg.batch_size
        epoch, i = divmod(step, N // B)
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(c.seed * 7919 + epoch))
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        b = {"idx": perm[i * B : (i + 1) * B]}  # (B,) global batch
        if c.objective == "flow":
            b["t"] = sample_t(B, c.t_sampling, c.t_mean, c.t_std, c.t_shift, generator=g)
        elif c.objective == "ddpm":
            b["t"] = torch.randint(0, self.schedule.T, (B,), generator=g)
        if c.objective == "classifier":
            b["affine"] = torch.rand(B, 4, generator=g)  # rotation, scale, x and y shift of the augmentation
        else:
            noise_shape = self.model.config.latent_shape if c.objective == "vae" else self.images.shape[1:]
            b["noise"] = torch.randn((B, *noise_shape), generator=g)
        b["drop"] = torch.rand(B, generator=g) < c.label_dropout
        sl = slice(self.rank * B // self.world, (self.rank + 1) * B // self.world)  # this rank's slice
        return {k: v[sl].pin_memory() if self.device.type == "cuda" else v[sl] for k, v in b.items()}

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """This process's slice of global batch `step` on the training device: x0, y and the objective's draws."""
        ahead, self.next_batch = self.next_batch, None
        b = ahead[1].result() if ahead is not None and ahead[0] == step else self.host_batch(step)
        b = {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
        idx = b.pop("idx")
        return {"x0": self.images[idx], "y": self.labels[idx], **b}

    def loss(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        c, x0, y = self.cfg, b["x0"], b["y"]
        if c.objective == "vae":
            return vae_loss(self.net, x0, b["noise"], self.model.config.kl_weight)["loss"]
        if c.objective == "classifier":
            return F.cross_entropy(self.net(random_affine(x0, b["affine"])), y, label_smoothing=c.label_smoothing)
        y = drop_labels(y, b["drop"], self.model.null_label)  # classifier-free guidance's label dropout
        if c.objective == "flow":
            return flow_loss(self.net, x0, y, b["t"], b["noise"])
        return ddpm_loss(self.net, self.schedule, x0, y, b["t"], b["noise"], c.ddpm_prediction, c.min_snr_gamma)

    # ---- the schedule -------------------------------------------------------------------------------------
    def progress(self) -> float:
        """Fraction of the run done: by steps, or by training time when a time budget is set (whichever is further).

        With a time budget the learning-rate schedule anneals on time, so a slower machine still ends its run
        with a fully decayed learning rate. Under DDP every process uses rank 0's clock.
        """
        c = self.cfg
        p = (self.step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        if c.time_budget is not None:
            clock = self.train_seconds
            if self.world > 1:  # (on the device: NCCL only moves GPU tensors)
                t = torch.tensor([clock], dtype=torch.float64, device=self.device)
                dist.broadcast(t, src=0)
                clock = float(t)
            p = max(p, clock / c.time_budget)
        return min(1.0, max(0.0, p))

    def lr_at(self, step: int, progress: float | None = None) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.lr_schedule == "cosine":
            p = min(1.0, (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)) if progress is None else progress
            return c.lr * (c.lr_min_ratio + (1 - c.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))
        return c.lr

    # ---- one step, and the loop ------------------------------------------------------------------------
    @torch.no_grad()
    def update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))  # short runs: warm the EMA up
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)  # one call
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):  # e.g. BatchNorm statistics
            b_ema.copy_(b)

    def train_step(self) -> float:
        """One optimizer update on global batch `self.step`; returns the loss (mean over all processes)."""
        t0 = time.perf_counter()
        b = self.batch(self.step)
        lr = self.lr_at(self.step, self.progress() if self.cfg.lr_schedule != "constant" else None)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss(b)
        self.opt.zero_grad(set_to_none=True)  # None already after our own steps; drops any a caller left behind
        loss.backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # free the gradients now, or they stay alive through the next forward
        self.update_ema()
        if self.pool is not None:  # draw the next batch on the host while the GPU works through this step
            self.next_batch = (self.step + 1, self.pool.submit(self.host_batch, self.step + 1))
        value = loss.detach()
        if self.world > 1:
            dist.all_reduce(value)
            value /= self.world
        value = float(value)
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {self.step}; lower the learning rate "
                                     f"(now {lr:g}) or enable grad_clip")
        self.step += 1
        self.train_seconds += time.perf_counter() - t0
        if self.step % self.cfg.log_every == 0 or self.step == 1:
            self.history.append({"step": self.step, "loss": value, "lr": lr, "seconds": self.train_seconds})
        return value

    def run(self, steps: int | None = None, progress: bool = True, checkpoint_path: str | Path | None = None,
            checkpoint_every: int | None = None, callback: Callable[[Trainer], bool | None] | None = None) -> Trainer:
        """Train until `steps` (default cfg.steps) or until cfg.time_budget seconds of training time are spent.

        `callback(trainer)` runs after every step outside the timed section; returning True stops training.
        """
        steps, budget = self.cfg.steps if steps is None else steps, self.cfg.time_budget
        show = progress and self.rank == 0
        if budget is None:  # the bar counts steps, or training seconds when the run is time-limited
            bar = tqdm(total=steps, initial=self.step, disable=not show, desc="train", unit="step", file=sys.stderr)
        else:
            bar = tqdm(total=round(budget), initial=round(self.train_seconds), disable=not show, desc="train",
                       unit="s", file=sys.stderr, bar_format="{l_bar}{bar}| {n:.0f}/{total} s{postfix}")
        try:
            while self.step < steps:
                before = self.train_seconds
                loss = self.train_step()
                bar.update(1 if budget is None else min(self.train_seconds, budget) - min(before, budget))
                if self.step % self.cfg.log_every == 0:
                    bar.set_postfix_str(f"step {self.step}, loss {loss:.4f}")
                stop = bool(callback(self)) if callback is not None else False
                stop = stop or (budget is not None and self.train_seconds >= budget)
                if self.world > 1:  # every process must stop at the same step
                    flag = torch.tensor([float(stop)], device=self.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop = bool(flag.item())
                if checkpoint_path and checkpoint_every and self.step % checkpoint_every == 0:
                    self.save(checkpoint_path)
                if stop:
                    break
        finally:
            bar.close()
        if checkpoint_path:
            self.save(checkpoint_path)
        return self

    # ---- checkpoints ----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        t.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for i, s in self.opt.state_dict()["state"].items():
            for name, v in s.items():
                t[f"optim.{i}.{name}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
        t["rng.torch"] = torch.get_rng_state()
        return t

    def meta(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.state_dict()["param_groups"]]
        config = getattr(self.model, "config", None)
        return {"kind": "train-state", "model": type(self.model).__name__,
                "config": config.to_dict() if config is not None else {}, "train": asdict(self.cfg),
                "step": self.step, "train_seconds": self.train_seconds, "history": self.history,
                "optim_param_groups": groups, "num_params": sum(p.numel() for p in self.model.parameters())}

    def save(self, path: str | Path) -> None:
        """Atomic training-state checkpoint (rank 0 writes; others wait)."""
        if self.rank == 0:
            save_checkpoint(path, self.state_tensors(), self.meta())
        if self.world > 1:
            dist.barrier()

    def load(self, path: str | Path) -> Trainer:
        """Restore model, EMA, optimizer, step, history and RNG state from a training checkpoint of the same run."""
        tensors, meta = load_checkpoint(path, kind="train-state")
        mine = self.meta()
        for key in ("model", "config"):
            if meta[key] != mine[key]:
                raise CheckpointError(f"{path} was trained with {key} {meta[key]}, this run has {mine[key]}")
        saved = build_config(TrainConfig, meta["train"])
        if (saved.objective, saved.seed) != (self.cfg.objective, self.cfg.seed):
            raise CheckpointError(f"{path} was trained with objective {saved.objective!r} and seed {saved.seed}, "
                                  f"this run has {self.cfg.objective!r} and {self.cfg.seed}")
        load_state(self.model, tensors, "model.", "model")
        load_state(self.ema, tensors, "ema.", "EMA model")
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v.to(self.device) if name != "step" else v
        groups = self.opt.state_dict()["param_groups"]
        for g, saved_group in zip(groups, meta["optim_param_groups"]):
            g.update(saved_group)
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.torch"])
        self.step, self.train_seconds, self.history = meta["step"], meta["train_seconds"], list(meta["history"])
        return self
