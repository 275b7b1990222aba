"""The DreamZero trainer: one process per GPU under torchrun (or a single process), FSDP2 across ranks.

What it does (docs/reference.md#training):
- model: the DiT with its action/state encoders and action decoder, trained; the text encoder, image encoder and VAE
  are not in the training graph at all (their outputs are precomputed by `dz prepare-data`, so they stay frozen);
  optionally initialized from a safetensors checkpoint (dreamzero.checkpoint) and given a new embodiment slot
  (copied from an existing one, or fresh) for a new robot;
- optimizer: AdamW, betas (0.95, 0.999), eps 1e-8, weight decay 1e-5 (not on biases and norm weights, as the
  release's HF Trainer), lr 1e-5 with a linear warmup over the first 5% of the steps and a cosine decay to 0,
  gradient clipping (max norm 1.0), gradient accumulation;
- precision: bf16 autocast on GPU (fp32 master weights, fp32 loss); fp32 on CPU; activation checkpointing per
  block (`model.gradient_checkpointing`);
- scale: world size > 1 (torchrun) shards every block and the root with FSDP2 `fully_shard` (bf16 parameters and
  fp32 gradient reduction on GPU), nccl on GPU, gloo on CPU;
- checkpoints: torch.distributed.checkpoint (sharded, one file per rank) into `<out>/checkpoints/step_XXXXXXXX`,
  written to a temporary folder first; when every rank has finished, rank 0 writes `trainer_state.json` last (it
  lists every file of the checkpoint with its size: a checkpoint is complete when all of them are there), renames
  the folder to its final name and replaces `latest` atomically. Old checkpoints are pruned by moving each out of
  its final name before deleting it, so a folder under a final name is always complete. A run killed anywhere in a
  save keeps every finished checkpoint; the next run finds the newest complete one by itself (`latest_checkpoint`:
  `latest` when it names a complete checkpoint, else the newest complete folder) and removes what a killed save
  left behind (those folder rules: checkpoint_dir.py). `DZ_FAULT_AT` (dz_kernels/env.py, `FAULT_POINTS`) ends the
  process at a named point of a save, for the kill tests. Resume restores the model, the optimizer, the step (the
  data position and the learning rate are functions of it) and the RNG states, so the next losses equal those of
  an uninterrupted run;
- data: the prepared clips of one or more datasets (`prepare.py`), a seeded permutation per epoch; optimizer step s
  takes global positions s*G .. (s+1)*G - 1 (G = world x batch x accumulation), rank r its share; the noise of each
  clip comes from a seed of (seed, step, position) (step.py), so one rank or many see the same numbers;
- logging: rank 0 writes `<out>/metrics.jsonl`, TensorBoard scalars (when tensorboard imports) and a tqdm bar, with
  the loss terms, gradient norm, learning rate, tokens/s and MFU (model FLOPs of step.training_flops over the
  device's dense bf16 peak).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from dz_kernels import env
from dz_kernels.atomic import atomic_write_json, atomic_write_text, fsync_dir, fsync_tree

from ..backend import install_ops
from ..config import VARIANTS, DreamZeroConfig, get_config
from ..dreamzero import DreamZero
from ..schedulers import FlowMatchTrainingSchedule
from .checkpoint_dir import (FAULT_EXIT_CODE, FAULT_POINTS, STEP_RE, checkpoint_problem, clean_stale, fault_point,
                             latest_checkpoint, quiet_single_process, remove_checkpoint)
from .prepare import PreparedDataset
from .step import NoiseConfig, draw_noise, flow_matching_loss, sample_seed, training_flops

__all__ = ["TrainConfig", "Trainer", "PRESETS", "resolve_model_config", "lr_at", "peak_flops", "model_config_from_dict",
           "latest_checkpoint", "checkpoint_problem", "FAULT_POINTS", "FAULT_EXIT_CODE"]


@dataclass
class TrainConfig:
    """Everything a run needs; `dz train --help` lists the same fields."""
    data: list
    out_dir: str
    model: str = "droid-14b"
    model_overrides: dict = field(default_factory=dict)
    init: str | None = None               # safetensors checkpoint (file, index or folder) to start from
    init_layout: str | None = None        # its key layout ('dreamzero', 'wan', 'diffusers'); None: detect
    add_embodiment: str | None = None     # "fresh" or the id of the slot to copy, for a new robot
    steps: int = 1000
    batch_size: int = 1                   # clips per rank per micro-step
    grad_accum: int = 1
    lr: float = 1e-5
    betas: tuple = (0.95, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-5
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    noise: str = "flash"                  # "flash" or "base"
    beta_a: float = 7.0
    beta_b: float = 1.0
    precision: str = "auto"               # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp32"
    gradient_checkpointing: bool = True
    ops: str = "reference"                # "reference" or "dz" (dz_kernels' op set, installed by its apply_)
    save_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 1
    seed: int = 0
    resume: str = "auto"                  # "auto" (latest in out_dir if any), "none", or a checkpoint folder
    device: str = "auto"                  # "auto", "cpu", "cuda"
    peak_tflops: float | None = None      # per device, for MFU (default: from the device name)
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            raise ValueError("TrainConfig.data needs at least one prepared dataset folder")
        for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto/bf16/fp32, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto/cpu/cuda, got {self.device!r}")
        if self.ops not in ("reference", "dz"):
            raise ValueError(f"ops must be 'reference' or 'dz', got {self.ops!r}")
        if not (0.0 <= self.warmup_ratio < 1.0):
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be > 0")
        self.betas = tuple(float(b) for b in self.betas)
        NoiseConfig(self.noise, self.beta_a, self.beta_b)  # validates

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


PRESETS = VARIANTS          # the trainer's presets are config.py's variants (e.g. "tiny-synthetic")


def resolve_model_config(name: str, overrides: dict | None = None) -> DreamZeroConfig:
    """A config name or variant of config.py (e.g. 'tiny-synthetic'), with field overrides on top."""
    return get_config(name, **(overrides or {}))


def lr_at(step: int, total: int, lr: float, warmup_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup (step+1)/W over W = ceil(ratio * total) steps,
    then cosine from lr to 0 at `total`."""
    warm = math.ceil(warmup_ratio * total)
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device from its name, from the project's one table of published peaks
    (dz_bench.peaks); None on a CPU, for fp32, or for a device the table does not know."""
    if device.type != "cuda" or precision != "bf16":
        return None
    from dz_bench.peaks import dense_peak_flops

    return dense_peak_flops(torch.cuda.get_device_name(device), "bf16")


def model_config_from_dict(d: dict) -> DreamZeroConfig:
    d = dict(d)
    d["patch_size"] = tuple(d["patch_size"])
    return DreamZeroConfig(**d)


def _decay_split(model: torch.nn.Module) -> tuple:
    """(decay, no_decay) parameters: no weight decay on biases and LayerNorm/RMSNorm weights (HF Trainer's rule)."""
    norm_params = set()
    for mod in model.modules():
        if isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__ == "RMSNorm":
            norm_params.update(id(p) for p in mod.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if ("bias" in name or id(p) in norm_params) else decay).append(p)
    return decay, no_decay


class Trainer:
    """Build the model, optimizer and data from a TrainConfig; `train()` runs to cfg.steps (resuming if asked)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._init_distributed()
        self.data = PreparedDataset(cfg.data)
        mcfg = resolve_model_config(cfg.model, cfg.model_overrides)
        self.model_cfg = mcfg
        self.num_chunks = self.data.check_model(mcfg)
        self.precision = ("bf16" if self.device.type == "cuda" else "fp32") if cfg.precision == "auto" else \
            cfg.precision
        self.autocast_dtype = torch.bfloat16 if self.precision == "bf16" else None
        self.model = self._build_model(mcfg)
        self.layout = self.model.layout("train", num_chunks=self.num_chunks)
        decay, no_decay = _decay_split(self.model)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas,
                                           eps=cfg.eps)
        self.schedule = FlowMatchTrainingSchedule()
        self.noise = NoiseConfig(cfg.noise, cfg.beta_a, cfg.beta_b)
        self.global_batch = self.world * cfg.batch_size * cfg.grad_accum
        self.step = 0
        self.history: list = []
        self._perm_cache: dict = {}
        self.peak = (cfg.peak_tflops * 1e12) if cfg.peak_tflops else peak_flops(self.device, self.precision)
        self.flops_per_step = training_flops(self.model_cfg, self.num_chunks, self.global_batch)
        self.tokens_per_step = self.layout.q_len * self.global_batch
        if env.fault_at() is not None and env.fault_at() not in FAULT_POINTS:
            raise ValueError(f"DZ_FAULT_AT={env.fault_at()!r} names no fault point; known: {FAULT_POINTS}")
        if self.rank == 0:
            clean_stale(os.path.join(cfg.out_dir, "checkpoints"))
        self._barrier()
        if cfg.resume != "none":
            path = latest_checkpoint(cfg.out_dir) if cfg.resume == "auto" else cfg.resume
            if path is not None:
                self.load(path)

    # ------------------------------------------------------------------ set-up
    def _init_distributed(self) -> None:
        cfg = self.cfg
        world = env.world_size()
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if want_cuda else "gloo")
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if want_cuda:
            local = env.local_rank()
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")

    def _build_model(self, mcfg: DreamZeroConfig) -> torch.nn.Module:
        """The model on its device: initialized (or loaded from cfg.init) once, on rank 0 only when distributed --
        the other ranks build it on the meta device, and the weights reach every shard by a broadcast from rank 0
        after fully_shard (so a node never holds one full fp32 copy per GPU)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if self.rank == 0:
            if cfg.init:
                from ..checkpoint import load_model
                model = load_model(mcfg, cfg.init, cfg.init_layout, dtype=torch.float32, device="cpu",
                                   allow_missing_heads=True)
            else:
                model = DreamZero(mcfg)
        else:
            with torch.device("meta"):
                model = DreamZero(mcfg)
        if cfg.add_embodiment is not None:
            src = None if cfg.add_embodiment == "fresh" else int(cfg.add_embodiment)
            if src is not None and not 0 <= src < model.cfg.num_embodiments:
                raise ValueError(f"add_embodiment copies slot {src}, but the model has {model.cfg.num_embodiments}")
            slot = model.add_embodiment(init_from=src)
            self._log(f"added embodiment slot {slot} ({'fresh' if src is None else f'copy of slot {src}'})")
        self.model_cfg = model.cfg
        self.data.check_embodiments(model.cfg.num_embodiments)
        if self.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

            full_sd = model.state_dict() if self.rank == 0 else {}
            with torch.device("meta"):
                model = DreamZero(self.model_cfg)
            mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if self.precision == "bf16" else MixedPrecisionPolicy())
            for blk in model.blocks:
                # the model computes every block's cross-attention k/v up front (DreamZero.context_kv, outside the
                # block's forward): the cross-attention is its own FSDP unit and context_kv one of its forwards.
                # Its k/v come back as views that nothing modifies in place, which FSDP2 warns about.
                fully_shard(blk.cross_attn, mp_policy=mp)
                register_fsdp_forward_method(blk.cross_attn, "context_kv")
                fully_shard(blk, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPCrossAttention\) returned a view")
            model.to_empty(device=self.device)
            set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=True))
            del full_sd
        else:
            model.to(self.device)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.ops != "reference":
            self._ops_handle = install_ops(model, cfg.ops)       # dreamzero.backend: the op set's provider
        model.train()
        return model

    # ------------------------------------------------------------------ data
    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            self._perm_cache[epoch] = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.data))
        return self._perm_cache[epoch]

    def positions(self, step: int, micro: int, rank: int) -> list:
        """Global batch positions of (step, micro-step, rank): rank r's B clips of micro-step m."""
        B = self.cfg.batch_size
        base = step * self.global_batch + (micro * self.world + rank) * B
        return list(range(base, base + B))

    def _items(self, positions: list) -> list:
        n = len(self.data)
        return [int(self._perm(p // n)[p % n]) for p in positions]

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        sums = torch.zeros(3, dtype=torch.float64)
        for micro in range(cfg.grad_accum):
            pos = self.positions(step, micro, self.rank)
            batch = self.data.collate(self._items(pos)).to(self.device, non_blocking=True)
            seeds = [sample_seed(cfg.seed, step, p - step * self.global_batch) for p in pos]
            noise = draw_noise(self.schedule, batch, self.model_cfg, self.noise, seeds)
            if self.distributed:
                self.model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            out = flow_matching_loss(self.model, batch, self.schedule, noise, self.layout, self.autocast_dtype)
            (out.loss / cfg.grad_accum).backward()
            sums += torch.stack([out.loss.detach(), out.video_loss.detach(), out.action_loss.detach()]).double().cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums /= cfg.grad_accum
        if self.distributed:
            t = sums.to(self.device)
            dist.all_reduce(t)
            sums = t.cpu() / self.world
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.step += 1
        m = {"step": self.step, "loss": float(sums[0]), "video_loss": float(sums[1]), "action_loss": float(sums[2]),
             "grad_norm": float(grad_norm), "lr": lr, "step_time_s": dt, "tokens_per_s": self.tokens_per_step / dt,
             "mfu": (self.flops_per_step / dt / (self.peak * self.world)) if self.peak else None}
        return m

    @torch.no_grad()
    def eval_loss(self, items: list, seed: int = 12345) -> dict:
        """Loss of the clips `items` (dataset indices) under fixed noise (seeded by `seed`), without training; every
        rank must call it with the same arguments (FSDP). Returns {'loss', 'video_loss', 'action_loss'}."""
        batch = self.data.collate(items).to(self.device)
        seeds = [sample_seed(seed, -1, j) for j in range(len(items))]
        noise = draw_noise(self.schedule, batch, self.model_cfg, self.noise, seeds)
        out = flow_matching_loss(self.model, batch, self.schedule, noise, self.layout, self.autocast_dtype)
        return {"loss": float(out.loss), "video_loss": float(out.video_loss), "action_loss": float(out.action_loss)}

    # ------------------------------------------------------------------ the loop
    def train(self) -> list:
        """Run optimizer steps until cfg.steps; returns the metrics of the steps run here (rank 0 also logs them)."""
        cfg = self.cfg
        writer = self._tensorboard() if self.rank == 0 else None
        bar = None
        if self.rank == 0 and cfg.progress:
            try:
                from tqdm import tqdm
                bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
            except ImportError:
                bar = None
        ran = []
        os.makedirs(cfg.out_dir, exist_ok=True)
        try:
            while self.step < cfg.steps:
                m = self.train_step()
                ran.append(m)
                self.history.append(m)
                if self.rank == 0:
                    if m["step"] % cfg.log_every == 0 or m["step"] == cfg.steps:
                        with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
                            f.write(json.dumps(m) + "\n")
                        if writer is not None:
                            for k in ("loss", "video_loss", "action_loss", "grad_norm", "lr", "tokens_per_s", "mfu"):
                                if m[k] is not None:
                                    writer.add_scalar(f"train/{k}", m[k], m["step"])
                    if bar is not None:
                        bar.update(1)
                        post = {"loss": f"{m['loss']:.4f}", "tok/s": f"{m['tokens_per_s']:.0f}"}
                        if m["mfu"] is not None:
                            post["mfu"] = f"{100 * m['mfu']:.1f}%"
                        bar.set_postfix(post)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        return ran

    def _tensorboard(self):
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(os.path.join(self.cfg.out_dir, "tensorboard"))

    def _log(self, msg: str) -> None:
        if getattr(self, "rank", 0) == 0:
            print(f"[dz train] {msg}", flush=True)

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def save(self) -> str:
        """Write a sharded checkpoint of the current step atomically; returns its folder."""
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file

        root = os.path.join(self.cfg.out_dir, "checkpoints")
        name = f"step_{self.step:08d}"
        final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
        if self.rank == 0:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self._barrier()
        with quiet_single_process():
            dcp.save(self._state(), checkpoint_id=tmp, no_dist=not self.distributed)
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_file(rng, os.path.join(tmp, f"rng_rank{self.rank:05d}.safetensors"))
        self._barrier()                                   # every rank's files are in tmp
        if self.rank == 0:
            # written last: it lists every file of the checkpoint, which makes it complete (checkpoint_problem)
            files = {}
            for dirpath, _, fns in os.walk(tmp):
                for fn in fns:
                    fp = os.path.join(dirpath, fn)
                    files[os.path.relpath(fp, tmp)] = os.path.getsize(fp)
            atomic_write_json(os.path.join(tmp, "trainer_state.json"), {
                "step": self.step, "world_size": self.world, "global_batch": self.global_batch,
                "num_items": len(self.data), "num_chunks": self.num_chunks,
                "model_config": dataclasses.asdict(self.model_cfg), "train_config": self.cfg.to_dict(),
                "data_stats": self.data.normalization(),
                "history_tail": self.history[-20:], "files": files})
            fsync_tree(tmp)
            old = None
            if os.path.exists(final):
                old = final + f".old-{os.getpid()}"
                os.rename(final, old)
            os.rename(tmp, final)
            fsync_dir(root)
            fault_point("save:after-rename")
            atomic_write_text(os.path.join(root, "latest"), name + "\n")
            if old:
                remove_checkpoint(old)
            self._prune(root, name)
        self._barrier()
        return final

    def _prune(self, root: str, newest: str) -> None:
        """Keep the newest keep_checkpoints checkpoints, and always `newest` (the one just saved)."""
        done = sorted(d for d in os.listdir(root) if STEP_RE.match(d) and d != newest)
        for d in done[:max(0, len(done) - (self.cfg.keep_checkpoints - 1))]:
            remove_checkpoint(os.path.join(root, d))

    def load(self, path: str) -> None:
        """Restore model, optimizer, step and RNG from a checkpoint folder written by `save` (any world size)."""
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import set_state_dict

        st_path = os.path.join(path, "trainer_state.json")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise FileNotFoundError(f"{path} is not a complete checkpoint: {problem}")
        with open(st_path) as f:
            st = json.load(f)
        saved_cfg = model_config_from_dict(st["model_config"])
        if saved_cfg != self.model_cfg:
            raise ValueError(f"checkpoint {path} holds a model {saved_cfg}, this run builds {self.model_cfg}")
        if st.get("global_batch") != self.global_batch or st.get("num_items") != len(self.data):
            self._log(f"warning: resuming with global batch {self.global_batch} over {len(self.data)} clips; the "
                      f"checkpoint had {st.get('global_batch')} over {st.get('num_items')}: the data order differs")
        state = self._state()
        with quiet_single_process():
            dcp.load(state, checkpoint_id=path, no_dist=not self.distributed)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.step = int(st["step"])
        self.history = list(st.get("history_tail", []))
        rng_path = os.path.join(path, f"rng_rank{self.rank:05d}.safetensors")
        if os.path.exists(rng_path) and st.get("world_size") == self.world:
            rng = load_file(rng_path)
            torch.set_rng_state(rng["cpu"])
            if self.device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        self._log(f"resumed from {path} at step {self.step}")

    def full_state_dict(self) -> dict | None:
        """The unsharded model weights on the CPU (on rank 0; None elsewhere), for export."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.rank == 0 else None

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()
