"""The training loop: ``train(config)`` runs a task to ``train.steps``, resumable, on one or many processes.

Per optimizer step: the learning rate is set from the step alone; ``accumulate`` global micro-batches are drawn
from the data order, each process backpropagates its shard's share of the batch-mean loss (DDP averages the
gradients over processes, so the sum equals one process's mean over the global batch); gradients are clipped,
AdamW steps, and the EMA follows.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from unnoise.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_optimizer,
    optimizer_parts,
    prefixed,
    save_checkpoint,
    unprefixed,
)
from unnoise.train.config import TrainConfig, config_from_dict
from unnoise.train.data import DataOrder, build_dataset
from unnoise.train.distributed import World, no_sync, setup, teardown, wrap
from unnoise.train.ema import EMA
from unnoise.train.progress import Progress
from unnoise.train.tasks import Task, make_task

# Settings a resumed run may change; any other difference from the checkpoint's config is an error.
RESUMABLE_CHANGES = {"steps", "log_every", "checkpoint_every", "keep", "sample_every", "threads", "tensorboard"}
RESUMABLE_CHANGES |= {"attention"}


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``optim.lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` (or constant)."""
    o, total = cfg.optim, cfg.train.steps
    if step <= o.warmup_steps:
        return o.lr * step / max(o.warmup_steps, 1)
    if o.decay == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(total - o.warmup_steps, 1)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(cfg: TrainConfig, *, resume: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Train until ``cfg.train.steps``; returns what was exported (``out_dir/model``; ``out_dir/lora.safetensors``
    for a LoRA)."""
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    world = setup(cfg.train.device)
    try:
        return _Run(cfg, world, log).run(resume)
    finally:
        teardown()


class _Run:
    def __init__(self, cfg: TrainConfig, world: World, log: Callable[[str], None] | None):
        self.cfg, self.world = cfg, world
        self.out = Path(cfg.out_dir)
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        self.dataset = build_dataset(cfg.data)
        self.task: Task = make_task(cfg, self.dataset, world)
        for module in self.task.modules.values():
            module.to(world.device).train()
        # a module without trainable parameters (a distillation's target network) is neither wrapped nor clipped
        trainable = [name for name, m in self.task.modules.items() if any(p.requires_grad for p in m.parameters())]
        self.nets = {name: wrap(m, world) if name in trainable else m for name, m in self.task.modules.items()}
        o = cfg.optim
        self.optimizers = {  # the learning rate is set before every step (_optimizer_step)
            name: torch.optim.AdamW(m.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
            for name, m in self.task.modules.items()
        }
        e = cfg.ema
        model = self.task.modules["model"]
        self.ema = EMA(model, decay=e.decay, warmup_power=e.warmup_power, start_step=e.start_step) if e.decay else None
        self.order = DataOrder(len(self.dataset), cfg.seed)
        self.step = 0
        columns = [*self.task.log_keys, "lr", *(f"grad_norm{'' if n == 'model' else '_' + n}" for n in trainable)]
        self.progress = Progress(self.out, cfg.train, columns, world.is_main, log)

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self, resume: bool) -> Path:
        if resume:
            self._resume()
        elif list_checkpoints(self.out):
            raise FileExistsError(f"{self.out} already holds checkpoints; pass --resume to continue that run")
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        self.progress.start(self.step)
        t = self.cfg.train
        while self.step < t.steps:
            logs = self._optimizer_step()
            self.progress.update(self.step, logs)
            if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                self._checkpoint()
            if t.sample_every and self.step % t.sample_every == 0 and self.step != t.steps:
                self._samples()
        self.progress.close()
        return self._export()

    def _optimizer_step(self) -> dict[str, float]:
        self.step += 1
        cfg, world = self.cfg, self.world
        lr = learning_rate(self.step, cfg)
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["lr"] = lr * self.task.lr_scale(name)
        micro_batch = cfg.train.batch_size // cfg.train.accumulate
        shard = world.shard(micro_batch)
        indices = self.order.take(cfg.train.batch_size)
        totals: dict[str, float] = {}
        for micro in range(cfg.train.accumulate):
            first = micro * micro_batch
            part = slice(first + shard.start, first + shard.stop)
            with no_sync(list(self.nets.values()), skip=micro < cfg.train.accumulate - 1):
                out = self.task.loss(self.nets, indices, part, self.step)
                # each process's sum over its part, scaled so that DDP's mean over processes is the batch mean
                scale = world.size / cfg.train.batch_size
                terms = [out[key] * scale for key in self.task.backward_keys if key in out]
                sum(terms[1:], terms[0]).backward()
            for key, value in out.items():
                totals[key] = totals.get(key, 0.0) + float(torch.as_tensor(value).detach()) / cfg.train.batch_size
        logs = {k: float(world.mean(torch.tensor(v * world.size, dtype=torch.float64))) for k, v in totals.items()}
        for name, opt in self.optimizers.items():
            params = [p for p in self.task.modules[name].parameters() if p.grad is not None]
            if cfg.optim.grad_clip and params:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                logs[f"grad_norm{'' if name == 'model' else '_' + name}"] = float(norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.task.modules["model"], self.step)
        logs["lr"] = lr
        return logs

    # -- checkpoints, samples, export ----------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        if not self.world.is_main:
            self.world.barrier()
            return
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        for name, module in self.task.modules.items():
            tensors |= prefixed(f"net.{name}", module.state_dict())
            opt_tensors, meta[name] = optimizer_parts(self.optimizers[name])
            tensors |= prefixed(f"optim.{name}", opt_tensors)
        if self.ema is not None:
            tensors |= prefixed("ema", self.ema.state_dict())
        tensors["rng.torch"] = torch.get_rng_state()
        state = {
            "step": self.step,
            "data": self.order.state(),
            "optimizers": meta,
            "config": self.cfg.to_dict(),
            "world_size": self.world.size,
        }
        save_checkpoint(self.out, self.step, tensors, state, keep=self.cfg.train.keep)
        self.world.barrier()

    def _resume(self) -> None:
        found = list_checkpoints(self.out)
        if not found:
            raise FileNotFoundError(f"--resume: {self.out} holds no complete checkpoint")
        tensors, state = load_checkpoint(found[-1])
        _check_same_run(config_from_dict(state["config"]), self.cfg)
        for name, module in self.task.modules.items():
            module.load_state_dict(unprefixed(f"net.{name}", tensors))
            load_optimizer(self.optimizers[name], unprefixed(f"optim.{name}", tensors), state["optimizers"][name])
        if self.ema is not None:
            self.ema.load_state_dict(unprefixed("ema", tensors))
        torch.set_rng_state(tensors["rng.torch"])
        self.order.load(state["data"])
        self.step = int(state["step"])
        self.progress.resume(self.step)

    def _averaged(self) -> torch.nn.Module:
        """A copy of the model with the EMA weights (the model itself without an EMA), in eval mode."""
        model = copy.deepcopy(self.task.modules["model"]).eval()
        if self.ema is not None:
            self.ema.copy_to(model)
        return model

    def _samples(self) -> None:
        if self.world.is_main:
            folder = self.out / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            self.task.samples(self._averaged()).save(folder / f"step_{self.step:08d}.png")
        self.world.barrier()

    def _export(self) -> Path:
        folder = self.task.export_path(self.out)
        if self.world.is_main:
            model = self._averaged()
            self.task.export(model, folder)
            (self.out / "samples").mkdir(parents=True, exist_ok=True)
            self.task.samples(model).save(self.out / "samples" / f"step_{self.step:08d}.png")
        self.world.barrier()
        return folder


def _check_same_run(saved: TrainConfig, given: TrainConfig) -> None:
    """Raise unless ``given`` differs from the checkpoint's config only in settings a resume may change."""
    a, b = saved.to_dict(), given.to_dict()
    keys = [*a, *(k for k in b if k not in a)]  # a table only one of them has ([lora]) differs too
    differ = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if k != "train" and a.get(k) != b.get(k)]
    differ += [f"train.{k}: {a['train'][k]!r} -> {v!r}" for k, v in b["train"].items() if a["train"].get(k) != v]
    differ = [d for d in differ if d.split(":")[0].removeprefix("train.") not in RESUMABLE_CHANGES]
    if differ:
        raise ValueError(f"--resume with a config that differs from the checkpoint's: {differ}")
