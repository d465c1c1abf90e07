"""Training: ``janus train``.

    janus prepare --trainpref corpus/train --validpref corpus/valid --src de --tgt en --destdir data-bin
    janus train --data data-bin --save-dir ckpt --preset iwslt --objective janus
    torchrun --nproc-per-node 8 -m janus train --data data-bin --save-dir ckpt   # data parallel

Adam with the inverse-sqrt schedule, label smoothing, gradient clipping and
accumulation, bf16/fp16 autocast on GPU and bf16 autocast on CPUs with native bf16 (``amp_context``),
validation loss, a tqdm bar with
tokens/s and a JSONL log (``save_dir/train.jsonl``). A run whose ``save_dir``
holds a checkpoint resumes from it and continues the same trajectory: data
order, masks, dropout and optimizer state all come back.

Each update is normalised over all of its tokens (every micro-batch of every
process), so ``update_freq=A`` on one process and ``A`` processes give the same
update as one batch holding the same sentences.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import increment_version

from janus import __version__
from janus.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    resolve_model_path,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
)
from janus.config import ModelConfig, TrainConfig, preset
from janus.data import Dataset, Masking, iterate_batches, iterate_updates, load_manifest, num_updates
from janus.losses import LOG_TERMS, Counts, Criterion, summarize, training_rows
from janus.memory import allocator_state, bound_onednn_cache, keep_freed_memory
from janus.model import JanusModel
from janus.streams import DecoderRows
from janus.vocab import Vocab


# -- schedule -------------------------------------------------------------------------------------
def inverse_sqrt_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update ``step`` (1-based): linear warmup from warmup_init_lr, then lr * sqrt(warmup/step)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * step / cfg.warmup_steps
    return cfg.lr * math.sqrt(max(cfg.warmup_steps, 1) / max(step, 1))


# -- process setup --------------------------------------------------------------------------------
@dataclass
class Env:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_env(cfg: TrainConfig) -> Env:
    """Pick the device and join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        keep_freed_memory()
        bound_onednn_cache()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Env(device, rank, world)


def all_reduce(t: torch.Tensor, env: Env) -> torch.Tensor:
    """Sum over processes (a no-op on one process)."""
    if env.world > 1:
        dist.all_reduce(t)
    return t


def amp_context(
    cfg: TrainConfig, device: torch.device, resumed: Optional[str] = None
) -> tuple[Any, Optional[torch.dtype]]:
    """(autocast context factory, dtype or None for fp32) from cfg.amp on ``device``.

    ``resumed``: the precision ("fp32", "bf16", "fp16") of the run being resumed, which ``auto``
    keeps, so that a resumed run continues its trajectory even where ``auto`` would now choose
    otherwise (e.g. a CPU run started in fp32 before CPU autocast existed).

    CUDA: ``auto`` is bf16 where the GPU has it, else fp16 (with loss scaling). CPU: ``auto`` is bf16
    where the CPU computes it natively (``janus.info.cpu_bf16_support``: AVX512_BF16 or AMX), else
    fp32; ``bf16`` is honoured anywhere (emulated bf16 is slower than fp32); fp16 is CUDA only. Under
    autocast the GEMMs run in the low precision (attention too on GPUs; on CPUs it stays fp32, see
    ``janus.model._sdpa``) while the weights, their gradients, the Adam states and the checkpoints
    stay fp32, and the loss terms (softmax statistics, SKL) are computed in fp32.
    """
    mode = cfg.amp
    if mode not in ("auto", "bf16", "fp16", "none"):
        raise ValueError(f"amp={mode!r}: choose auto, bf16, fp16 or none")
    if mode == "auto" and resumed is not None:
        if resumed not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"resumed precision {resumed!r}: expected fp32, bf16 or fp16")
        mode = "none" if resumed == "fp32" else resumed
    if mode == "none":
        return contextlib.nullcontext, None
    if device.type == "cuda":
        if mode == "auto":
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif device.type == "cpu":
        if mode == "fp16":
            raise ValueError(f"amp=fp16 needs a CUDA device; this run is on {device}: use --amp bf16 or none")
        if mode == "auto":
            from janus.info import cpu_bf16_support

            if not cpu_bf16_support()[0]:
                return contextlib.nullcontext, None
            mode = "bf16"
    elif mode == "auto":
        return contextlib.nullcontext, None
    else:
        raise ValueError(f"amp={mode} needs a CUDA or CPU device; this run is on {device}: use --amp none")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype


def precision_name(dtype: Optional[torch.dtype]) -> str:
    """How a run computes, for its log: "fp32", "bf16" or "fp16" (autocast)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# -- input pipeline -------------------------------------------------------------------------------
class Prefetch:
    """Iterate ``source`` in a background thread, at most ``depth`` items ahead.

    Collation and masking (numpy, the C++ pad op) then overlap the model's step. Order is
    the source's order and no global RNG is touched, so results do not change.
    """

    _END = object()

    def __init__(self, source: Iterator[Any], depth: int = 2, transform: Optional[Any] = None) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source, transform), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator[Any], transform: Optional[Any]) -> None:
        try:
            for item in source:
                if not self._put(transform(item) if transform else item):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failure(e))

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        """Stop the producer (when the consumer leaves early) and wait for it."""
        self._stop.set()
        self._thread.join()


@dataclass
class _Failure:
    error: BaseException


# -- the trainer ----------------------------------------------------------------------------------
class Trainer:
    """Owns the model, optimizer, data position and checkpoints of one training run."""

    def __init__(self, cfg: TrainConfig, model_overrides: Optional[dict[str, Any]] = None) -> None:
        self.cfg = cfg
        self.env = setup_env(cfg)
        self.save_dir = Path(cfg.save_dir)
        self.log_file = self.save_dir / "train.jsonl"
        data = Path(cfg.data)
        self.manifest = load_manifest(data)
        self.vocab = Vocab(data / self.manifest["vocab"])
        # Embedded in every checkpoint, so a checkpoint alone can decode.
        self.vocab_bytes = self.vocab.to_bytes()
        self.train_set = Dataset(data, "train")
        self.valid_set = Dataset(data, "valid") if "valid" in self.manifest["splits"] else None
        self.masking = Masking.from_config(cfg)
        self.weights = cfg.loss_weights()

        ckpt_path = latest_checkpoint(self.save_dir)
        self.ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
        if self.ckpt is not None:
            before = self.ckpt.config.get("train", {}).get("objective", cfg.objective)
            if before != cfg.objective:
                raise ValueError(
                    f"{self.ckpt.path} was trained with --objective {before}, this run asks for {cfg.objective}: "
                    f"use another --save-dir, or the same objective to resume"
                )
            model_cfg = ModelConfig.from_dict(self.ckpt.config["model"])
        else:
            over = dict(model_overrides or {})
            if cfg.dropout >= 0:
                over["dropout"] = cfg.dropout
            model_cfg = preset(cfg.preset, vocab_size=len(self.vocab), specials=self.vocab.specials, **over)
        self.model_cfg = model_cfg

        torch.manual_seed(cfg.seed)
        self.model = JanusModel(model_cfg).to(self.env.device)
        # Validation calls the plain module: ranks see different numbers of validation batches,
        # and a DDP forward may run collectives.
        self.loss_module = Criterion(self.model, cfg.objective, self.weights, cfg.label_smoothing,
                                     skl_grad_ar=0.0 if cfg.skl_stop_grad == "ar" else 1.0,
                                     exposure=cfg.nar_exposure, exposure_mask=cfg.nar_exposure_mask)  # fmt: skip
        self.criterion: nn.Module = self.loss_module
        if self.env.world > 1:
            self.criterion = nn.parallel.DistributedDataParallel(
                self.loss_module,
                device_ids=[self.env.device.index] if self.env.device.type == "cuda" else None,
                # the length head sits idle for `ar`, and during the AR-only updates of joint_start
                find_unused_parameters=self.weights.length == 0 or cfg.joint_start > 0,
            )
        # The fused AdamW (one kernel over all parameters) on CPUs and GPUs, the multi-tensor one
        # elsewhere: the per-parameter loop took 11.7 ms of a small-preset CPU update, the fused one
        # 3.8 ms, equal up to rounding (7e-9 apart after 30 steps). A resumed run keeps the implementation
        # its checkpoint was written with (load_state_dict restores the group's fused/foreach flags).
        fused = self.env.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.warmup_init_lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            fused=fused or None,
            foreach=None if fused else True,
        )
        resumed = None
        if self.ckpt is not None:
            # `auto` keeps the precision a run started with; one started before CPU autocast existed
            # (no record) trained in fp32 on a CPU.
            resumed = self.ckpt.state.get("precision", "fp32" if self.env.device.type == "cpu" else None)
        self.autocast, self.amp_dtype = amp_context(cfg, self.env.device, resumed)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.step, self.epoch, self.update_in_epoch = 0, 1, 0
        self.best_valid: Optional[float] = None
        self.saved_at = (0, time.monotonic())  # (step, monotonic time) of the last checkpoint or start
        self.init_source: Optional[dict[str, Any]] = None
        if self.ckpt is not None:
            self._restore(self.ckpt)
            self.saved_at = (self.step, time.monotonic())
        elif cfg.init_from:
            self.init_source = self._init_from(cfg.init_from)

    # -- checkpoints ----------------------------------------------------------------------------
    def _restore(self, ckpt: Any) -> None:
        self.model.load_state_dict(ckpt.model_state)
        restore_optimizer(self.optimizer, ckpt)
        st = ckpt.state
        self.step, self.epoch, self.update_in_epoch = st["step"], st["epoch"], st["update_in_epoch"]
        self.best_valid = st.get("best_valid")
        if st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        restore_rng(st["rng"])
        self.log(dict(event="resume", checkpoint=str(ckpt.path), step=self.step, epoch=self.epoch))

    def _init_from(self, source: str) -> dict[str, Any]:
        """Load the weights of checkpoint ``source`` (``TrainConfig.init_from``) into the fresh model, after
        checking that its vocabulary and architecture are this run's; the optimizer, schedule and update
        count stay fresh. Returns what was loaded (path, its update count and objective) for the log."""
        path = resolve_model_path(source)
        state, config = load_model_state(path)
        if "model" not in config:
            raise ValueError(f"--init-from {path}: its config has no 'model' entry; was it written by janus train?")
        folder = path if path.is_dir() else path.parent
        spm = folder / config.get("vocab", "spm.model")
        if not spm.is_file():
            raise ValueError(f"--init-from {path}: no vocabulary beside it ({spm}) to check against {self.cfg.data}")
        if spm.read_bytes() != self.vocab_bytes:
            raise ValueError(
                f"--init-from {path} was trained with another vocabulary than {self.cfg.data} ({spm} differs "
                f"from {Path(self.cfg.data) / self.manifest['vocab']}): prepare the data with that model's vocabulary"
            )
        theirs = ModelConfig.from_dict(config["model"]).to_dict()
        ours = self.model_cfg.to_dict()
        training_only = {"dropout", "attention_dropout", "activation_dropout"}  # not shapes: this run's apply
        differ = [f"{k} {theirs[k]} (checkpoint) vs {ours[k]} (this run)" for k in ours
                  if k not in training_only and theirs.get(k) != ours[k]]  # fmt: skip
        if differ:
            raise ValueError(
                f"--init-from {path}: its model differs from this run's (preset {self.cfg.preset}): "
                f"{'; '.join(differ)}. Pass the --preset (and model flags) it was trained with"
            )
        self.model.load_state_dict({k: v.to(self.env.device) for k, v in state.items()})
        train_cfg = config.get("train", {})
        step = config.get("step")
        if step is None and path.name.startswith("checkpoint_"):
            step = int(path.name.rsplit("_", 1)[-1])
        return dict(path=str(path), step=step, objective=train_cfg.get("objective"))

    def save(self, is_best: bool = False) -> None:
        self.saved_at = (self.step, time.monotonic())
        if not self.env.main:
            return
        state = dict(
            step=self.step,
            epoch=self.epoch,
            update_in_epoch=self.update_in_epoch,
            best_valid=self.best_valid,
            rng=capture_rng(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            precision=precision_name(self.amp_dtype),
        )
        config = dict(
            model=self.model_cfg.to_dict(),
            train=dataclasses.asdict(self.cfg),
            vocab="spm.model",
            janus_version=__version__,
            src=self.manifest.get("src"),
            tgt=self.manifest.get("tgt"),
        )
        save_checkpoint(
            self.save_dir,
            self.step,
            model_state=self.model.state_dict(),
            optimizer=self.optimizer,
            state=state,
            config=config,
            files={"spm.model": self.vocab_bytes},
            keep_last=self.cfg.keep_last,
            is_best=is_best,
        )

    # -- logging --------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """One line for the person running the training (main process only)."""
        if self.env.main:
            print(text, flush=True)

    def banner(self) -> None:
        """What this run is: objective, model, data, device and precision, budget, where it saves."""
        cfg, env, m = self.cfg, self.env, self.model_cfg
        train = self.manifest["splits"]["train"]
        valid = self.manifest["splits"].get("valid")
        budget = [f"{cfg.max_steps:,} updates" if cfg.max_steps > 0 else "",
                  f"{cfg.max_epochs} epochs" if cfg.max_epochs > 0 else ""]  # fmt: skip
        per_update = cfg.max_tokens * cfg.update_freq * env.world
        n = torch.get_num_threads()
        threads = f", {n} thread{'s' * (n != 1)}" if env.device.type == "cpu" else ""
        every = [f"{cfg.save_interval} updates" if cfg.save_interval > 0 else "epoch",
                 f"{cfg.save_interval_minutes:g} min" if cfg.save_interval_minutes > 0 else ""]  # fmt: skip
        self.say("\n".join([
            f"janus train: objective {cfg.objective}, preset {cfg.preset} ({m.encoder_layers}+{m.decoder_layers} "
            f"layers of {m.d_model}, {self.model.num_parameters():,} parameters, vocabulary {m.vocab_size:,})",
            f"  data {cfg.data}: train {train['kept']:,} pairs ({train['tgt_tokens']:,} target tokens)"
            + (f", valid {valid['kept']:,} pairs" if valid else ", no valid split"),
            f"  device {env.device}{threads}, {env.world} process(es), precision {precision_name(self.amp_dtype)}",
            f"  budget {' or '.join(b for b in budget if b) or 'no limit'}, at most {per_update:,} tokens per update "
            f"(max_tokens {cfg.max_tokens} x update_freq {cfg.update_freq} x {env.world} process(es))",
            f"  saving to {self.save_dir} every {' or '.join(e for e in every if e)}, keeping "
            + (f"the last {cfg.keep_last} and the best" if cfg.keep_last > 0 else "every checkpoint"),
        ]))  # fmt: skip
        if cfg.joint_start or cfg.joint_ramp:
            self.say(f"  schedule: P_AR alone for {cfg.joint_start:,} updates, then the other terms ramped in over "
                     f"{cfg.joint_ramp:,} updates")  # fmt: skip
        if cfg.skl_stop_grad:
            self.say(f"  SKL terms: no gradient into P_{cfg.skl_stop_grad.upper()} (skl_stop_grad={cfg.skl_stop_grad})")
        if cfg.nar_exposure:
            self.say(f"  NAR error exposure: the observed tokens of {cfg.nar_exposure:.0%} of the sentences are the "
                     "model's own first-pass predictions (nar_exposure), masked: "
                     f"{cfg.nar_exposure_mask} (nar_exposure_mask)")  # fmt: skip
        if self.ckpt is not None:
            extra = f" (--init-from {cfg.init_from} applies to fresh runs only)" if cfg.init_from else ""
            self.say(f"resuming from step {self.step} (checkpoint {self.ckpt.path}){extra}")
        elif self.init_source is not None:
            src = self.init_source
            after = f" after {src['step']:,} updates" if src.get("step") is not None else ""
            of = f" of objective {src['objective']}" if src.get("objective") else ""
            self.say(f"starting from the weights of {src['path']}{of}{after}, with a fresh optimizer and schedule")
        else:
            self.say("starting from scratch")

    def log(self, record: dict[str, Any]) -> None:
        if not self.env.main:
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        record = {"time": round(time.time(), 3), **record}
        with open(self.log_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- one update -----------------------------------------------------------------------------
    def _objective_at(self, step: int) -> str:
        """The objective whose rows update ``step`` (1-based) trains: ``ar`` while the joint_start schedule
        holds every other term at 0 (so that those updates cost what an ``ar`` update costs)."""
        return "ar" if self.cfg.joint_factor(step) == 0.0 else self.cfg.objective

    def _with_rows(
        self, batches: list, pin: bool = False, objective: Optional[str] = None
    ) -> list[tuple[Any, DecoderRows]]:
        """Pair each batch with its decoder rows for ``objective`` (default: the run's), built on the CPU
        (in the prefetch thread)."""
        sp = self.model_cfg.specials
        out = []
        for b in batches:
            rows = training_rows(b.tgt, b.masked, objective or self.cfg.objective, pad=sp.pad, mask=sp.mask)
            out.append((b.pin_memory(), rows.pin_memory()) if pin else (b, rows))
        return out

    def _rows_transform(self) -> Callable[[list], list[tuple[Any, DecoderRows]]]:
        """The prefetch transform from this update on: each update's batches with their rows, for the
        objective of its step (``_objective_at``), in order."""
        steps = itertools.count(self.step + 1)
        pin = self.env.device.type == "cuda"
        return lambda batches: self._with_rows(batches, pin, self._objective_at(next(steps)))

    def train_update(self, items: list[tuple[Any, DecoderRows]]) -> tuple[torch.Tensor, Counts, float]:
        """Forward/backward over this process's micro-batches (with their rows), then one optimizer step.

        Returns (summed term sums (len(LOG_TERMS),), update-wide counts, gradient norm).
        """
        env = self.env
        self.criterion.train()
        # Counted on the host tensors, then one small all-reduce: the update-wide normaliser.
        local = sum((Counts.of_batch(b.tgt_lengths, b.masked) for b, _ in items), Counts())
        norm = Counts.from_tensor(all_reduce(local.as_tensor().to(env.device), env).cpu())
        sums = torch.zeros(len(LOG_TERMS), device=env.device)
        # The schedule of the non-AR terms (TrainConfig.joint_start / joint_ramp); the rows of ``items``
        # were built for the same objective (_objective_at).
        self.loss_module.weights = self.weights.scaled_except_ar(self.cfg.joint_factor(self.step + 1))
        self.loss_module.objective = self._objective_at(self.step + 1)
        lr = inverse_sqrt_lr(self.step + 1, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        for i, (b, rows) in enumerate(items):
            b, rows = b.to(env.device, non_blocking=True), rows.to(env.device, non_blocking=True)
            # Gradients are all-reduced once per update, after the last micro-batch.
            last = i == len(items) - 1
            ctx = self.criterion.no_sync() if env.world > 1 and not last else contextlib.nullcontext()
            with ctx:
                with self.autocast():
                    loss, s = self.criterion(b.src, b.tgt, b.masked, norm, float(env.world), rows)
                self.scaler.scale(loss).backward()
            sums += s
        self.scaler.unscale_(self.optimizer)
        # With max_norm = inf this only measures the norm (logged either way).
        max_norm = self.cfg.clip_norm if self.cfg.clip_norm > 0 else math.inf
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # The fused AdamW writes the parameters in place without bumping their version counters, which
        # key the inference caches (Attention.fused_qkv_weights): without this, every validation after
        # the first would read the q/k/v weights of the first.
        increment_version(list(self.model.parameters()))
        self.step += 1
        return sums, norm, gnorm

    @torch.no_grad()
    def validate(self) -> Optional[dict[str, float]]:
        """Validation terms (means over the split), summed over processes; None without a valid split."""
        if self.valid_set is None:
            return None
        env = self.env
        self.loss_module.eval()
        # Always the full objective, whatever the schedule: validations stay comparable along a run.
        self.loss_module.weights, self.loss_module.objective = self.weights, self.cfg.objective
        sums = torch.zeros(len(LOG_TERMS), device=env.device)
        counts = Counts()
        batches = iterate_batches(self.valid_set, self.cfg.max_tokens, self.masking, seed=self.cfg.seed)
        for i, b in enumerate(batches):
            if self.cfg.max_valid_batches and i >= self.cfg.max_valid_batches:
                break
            if i % env.world != env.rank:
                continue
            own = Counts.of_batch(b.tgt_lengths, b.masked)  # on the host tensors: no device sync
            counts = counts + own
            ((b, rows),) = self._with_rows([b])
            b, rows = b.to(env.device), rows.to(env.device)
            with self.autocast():
                _, s = self.loss_module(b.src, b.tgt, b.masked, norm=own, rows=rows)
            sums += s
        sums = all_reduce(sums, env)
        counts = Counts.from_tensor(all_reduce(counts.as_tensor().to(env.device), env).cpu())
        return summarize(sums.cpu(), counts, self.weights)

    # -- the loop -------------------------------------------------------------------------------
    def _updates(self) -> Iterator[list]:
        return iterate_updates(
            self.train_set,
            self.cfg.max_tokens,
            seed=self.cfg.seed,
            epoch=self.epoch,
            masking=self.masking,
            update_freq=self.cfg.update_freq,
            world_size=self.env.world,
            rank=self.env.rank,
            start_update=self.update_in_epoch,
        )

    def _done(self) -> bool:
        c = self.cfg
        return (c.max_steps > 0 and self.step >= c.max_steps) or (c.max_epochs > 0 and self.epoch > c.max_epochs)

    def _log_window(self, window: "_Window", gnorm: float, bar: Any) -> None:
        stats = summarize(all_reduce(window.sums, self.env).cpu(), window.counts, self.weights)
        tps = window.tokens / max(time.perf_counter() - window.start, 1e-9)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{tps:,.0f}")
        lr = self.optimizer.param_groups[0]["lr"]
        scheduled = self.cfg.joint_start or self.cfg.joint_ramp
        joint = {"joint_factor": round(self.cfg.joint_factor(self.step), 6)} if scheduled else {}
        self.log(dict(event="train", step=self.step, epoch=self.epoch, lr=lr, gnorm=round(gnorm, 6),
                      tokens_per_s=round(tps, 1), **joint, **_rounded(stats)))  # fmt: skip
        window.reset()

    def _validate_and_log(self, bar: Any) -> tuple[Optional[dict[str, float]], bool]:
        """Validate, track the best loss, log; returns (summary or None, is_best)."""
        v = self.validate()
        if v is None:
            return None, False
        is_best = self.best_valid is None or v["loss"] < self.best_valid
        if is_best:
            self.best_valid = v["loss"]
        self.log(dict(event="valid", step=self.step, epoch=self.epoch, best=is_best, **_rounded(v)))
        shown = " ".join(f"{k}={v[k]:.3f}" for k in ("loss", "ar_nll", "nar_nll", "aux_nll", "length") if v[k])
        bar.write(f"step {self.step} valid {shown}")
        return v, is_best

    def _save_clock_due(self) -> bool:
        """Whether save_interval_minutes of wall time passed since the last checkpoint (or the start).

        Only the main process writes checkpoints, so the processes need not agree on it."""
        minutes = self.cfg.save_interval_minutes
        return minutes > 0 and time.monotonic() - self.saved_at[1] >= 60 * minutes

    def _due(self, interval: int, epoch_end: bool) -> bool:
        """An every-``interval``-updates event (interval 0: at the end of each epoch) or the last update."""
        return (interval > 0 and self.step % interval == 0) or (interval == 0 and epoch_end) or self._done()

    def run(self) -> dict[str, Any]:
        """Train until max_steps / max_epochs; returns the last validation summary (or {})."""
        from tqdm.auto import tqdm

        cfg, env = self.cfg, self.env
        self.log(dict(event="start", step=self.step, params=self.model.num_parameters(), device=str(env.device),
                      precision=precision_name(self.amp_dtype),
                      cpu_allocator=allocator_state(), world_size=env.world, objective=cfg.objective,
                      model=self.model_cfg.to_dict(), train=dataclasses.asdict(cfg),
                      **({"init_from": self.init_source} if self.init_source and self.step == 0 else {})))  # fmt: skip
        last_valid: dict[str, Any] = {}
        self.banner()
        if self._done():
            self.say(f"already finished at step {self.step} (max_steps {cfg.max_steps}, max_epochs {cfg.max_epochs}): "
                     "nothing to do; raise --max-steps or --max-epochs to train on")  # fmt: skip
            return last_valid
        window = _Window(torch.zeros(len(LOG_TERMS), device=env.device))
        while not self._done():
            per_epoch = num_updates(self.train_set, cfg.max_tokens, seed=cfg.seed, epoch=self.epoch,
                                    update_freq=cfg.update_freq, world_size=env.world)  # fmt: skip
            if per_epoch == 0:
                raise ValueError(
                    f"the training split makes no full update with max_tokens={cfg.max_tokens}, "
                    f"update_freq={cfg.update_freq} on {env.world} process(es): lower them"
                )
            bar = tqdm(total=per_epoch, initial=self.update_in_epoch, desc=f"epoch {self.epoch}",
                       disable=not (env.main and cfg.progress), mininterval=1.0, dynamic_ncols=True)  # fmt: skip
            updates = Prefetch(self._updates(), transform=self._rows_transform())
            try:
                for batches in updates:
                    sums, norm, gnorm = self.train_update(batches)
                    self.update_in_epoch += 1
                    bar.update(1)
                    window.add(sums, norm)
                    if self.step % cfg.log_interval == 0 or self._done():
                        self._log_window(window, gnorm, bar)
                    epoch_end = self.update_in_epoch >= per_epoch
                    if epoch_end:
                        self.epoch, self.update_in_epoch = self.epoch + 1, 0
                    is_best = False
                    if self._due(cfg.validate_interval, epoch_end):
                        v, is_best = self._validate_and_log(bar)
                        last_valid = v or last_valid
                    if self._due(cfg.save_interval, epoch_end) or is_best or self._save_clock_due():
                        self.save(is_best=is_best)
                    if self._done() or epoch_end:
                        break
            finally:
                updates.close()
                bar.close()
        if self.saved_at[0] != self.step:
            self.save()
        self.log(dict(event="end", step=self.step, epoch=self.epoch))
        self.say(f"finished at step {self.step}: checkpoints in {self.save_dir}")
        return last_valid


@dataclass
class _Window:
    """Training terms accumulated between two log lines."""

    sums: torch.Tensor  # (len(LOG_TERMS),) on the training device
    counts: Counts = dataclasses.field(default_factory=Counts)
    tokens: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, sums: torch.Tensor, counts: Counts) -> None:
        self.sums += sums
        self.counts = self.counts + counts
        self.tokens += counts.ar_tokens + counts.sentences  # sum of n: target tokens with bos/eos

    def reset(self) -> None:
        self.sums.zero_()
        self.counts, self.tokens, self.start = Counts(), 0, time.perf_counter()


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 5) for k, v in d.items()}


def train(cfg: TrainConfig, model_overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run (or resume) training with ``cfg``; returns the last validation summary."""
    trainer = Trainer(cfg, model_overrides)
    try:
        return trainer.run()
    finally:
        if trainer.env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
