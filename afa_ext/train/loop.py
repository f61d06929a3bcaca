"""The training run: stages, epochs, evaluation, checkpoints and the files of ``--out``.

A run has one stage, or two for ``afa`` (and for any regulariser with ``stages = 2``):
stage 1 trains with AST from the pretrained source model; stage 2 trains with ACT from
the best stage-1 model, and that model also replaces the source model (whose features
the feature terms align to). Two stages of another regulariser follow the same schedule
with that regulariser in both. Each stage selects its best epoch on the validation split
only; the stage-2 start (the best stage-1 model) is a candidate too, so stage 2 never
hands back a model that does worse on validation than the one it started from. The test
split is evaluated once, on the final model.

Everything a resumed run needs is in ``checkpoint.pt``, written atomically after every
epoch (and, in a one-process run, after the step during which SIGTERM or Ctrl-C arrived):
model, source model, attention modules, optimizer, scheduler, stage, epoch and step,
best-so-far, the metrics so far and every RNG state. With data order and augmentation
drawn from (seed, epoch, sample index), a killed run restarted with ``--resume`` ends
bitwise where an uninterrupted one ends (on the CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import torch
from torch import nn

import afa_ext

from . import checkpoint, distributed, plots
from .config import (
    DELTA_ESTIMATES,
    RESUME_FREE,
    ConfigError,
    Stage,
    TrainConfig,
    epochs_per_stage,
    from_dict,
    load_toml,
    resolve,
    stage_plan,
    to_toml,
)
from .data import GlobalBatchSampler, load_data, mix_seed
from .identity import file_identity
from .models import FeatureHooks, build_model, feature_shapes, head_module_name, resolve_layers
from .outputs import CHECKPOINT, CONFIG, CURVES, MODEL, check_out_folder, write_metrics, write_result
from .pretrain import digits_source_path, digits_source_weights
from .regularizers import REGULARIZERS, Regularizer, check_channel_weights, source_parameters
from .state import BestModel, EpochRecord, EpochSums, RunState, StageResult
from .step import StepLosses, StepModule, step_losses

__all__ = ["run", "Interrupted", "Diverged"]

CHECKPOINT_VERSION = 2


class Diverged(RuntimeError):
    """The loss of an epoch was not finite; the checkpoint of the epoch before is kept."""


class Interrupted(Exception):
    """SIGTERM or Ctrl-C arrived; a checkpoint was written."""

    def __init__(self, signum: int, path: Path):
        super().__init__(
            f"interrupted by {signal.Signals(signum).name}: checkpoint written to {path}; continue with --resume"
        )
        self.signum = signum


@dataclass
class StageSetup:
    """What trains in the stage under way: its regulariser and feature term (with attention
    modules), the optimizer and its schedule, L2-SP's source values, and the step module
    (``wrapped`` in DistributedDataParallel under torchrun, made on first use)."""

    stage: Stage
    regularizer: Regularizer
    term: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    source_values: dict[str, torch.Tensor] | None
    step_module: StepModule
    wrapped: nn.Module | None = None


class _StopFlag:
    """Set by SIGTERM / SIGINT; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Defaults filled in and every setting checked; on --resume, the saved configuration,
    which must agree with the given one but for the settings a resumption may change."""
    resolved = resolve(config, torch.cuda.is_available())
    if resolved.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {resolved.device}: no CUDA device is available here; use --device cpu")
    out = Path(resolved.out)
    check_out_folder(out, resolved.resume)
    if resolved.resume:
        # Resolved too: a setting added since the run started takes its default.
        saved = resolve(from_dict(load_toml(str(out / CONFIG)), str(out / CONFIG)), torch.cuda.is_available())
        differing = [
            key for key, value in saved.to_dict().items() if key not in RESUME_FREE and value != getattr(resolved, key)
        ]
        if differing:
            details = ", ".join(f"{k}: saved {getattr(saved, k)!r}, given {getattr(resolved, k)!r}" for k in differing)
            raise ConfigError(
                f"--resume: the run in {out} was started with other settings ({details}); "
                f"resume it with the same settings"
            )
    return resolved


class Run:
    """One training run (every rank builds one)."""

    def __init__(
        self, config: TrainConfig, dist: distributed.Distributed, log: Callable[[str], None], progress: bool | None
    ):
        self.config = config
        self.dist = dist
        self.device = dist.device
        self.out = Path(config.out)
        self.log = log if dist.is_main else (lambda message: None)
        self.progress = (sys.stderr.isatty() if progress is None else progress) and dist.is_main
        self._prepare()

    # ------------------------------------------------------------------ set-up

    def _prepare(self) -> None:
        """Everything that can fail on bad input, before anything is written."""
        config = self.config
        torch.manual_seed(config.seed)
        if config.batch_size % self.dist.world:
            raise ConfigError(
                f"--batch-size {config.batch_size}: the global batch must split evenly over {self.dist.world} processes"
            )
        self.data = load_data(
            config.data,
            image_size=config.image_size,
            val_fraction=config.val_fraction,
            seed=config.seed,
            shots=config.shots,
        )
        if config.weights == digits_source_path(config.cache_dir, config.image_size):
            digits_source_weights(config.cache_dir, config.image_size, log=self.log)  # trained on first use
        model = build_model(config.arch, self.data.num_classes, config.weights, in_channels=self.data.in_channels)
        self.head = head_module_name(model, config.arch)
        self.layers = resolve_layers(model, config.layers)
        self.shapes = feature_shapes(model, self.layers, config.image_size, self.data.in_channels)
        self.stages: list[Stage] = stage_plan(config)
        self.epochs = epochs_per_stage(config, len(self.data.train))
        model = model.to(self.device)
        if config.sync_bn and self.dist.enabled:
            model = distributed.convert_sync_batchnorm(model, self.device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.source = copy.deepcopy(model).eval().requires_grad_(False)
        self.hooks = FeatureHooks(self.model, self.layers)
        self.source_hooks = FeatureHooks(self.source, self.layers)
        self.forward_model = torch.compile(self.model) if config.compile else self.model
        self.channel_weights = None
        self.delta_info: dict = {}
        self.resuming = config.resume and (self.out / CHECKPOINT).is_file()
        if any(REGULARIZERS[stage.reg].needs_channel_weights for stage in self.stages) and not self.resuming:
            self.channel_weights = self._shared_delta_weights()
        self.sampler = GlobalBatchSampler(
            len(self.data.train),
            config.batch_size,
            seed=config.seed,
            shuffle=True,
            rank=self.dist.rank,
            world=self.dist.world,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")

    def _delta_weights(self):
        from .delta_weights import compute_channel_weights, load_channel_weights

        choice = self.config.delta_weights
        if choice not in DELTA_ESTIMATES:
            try:
                loaded = [w.float() for w in load_channel_weights(choice)]
            except ValueError as error:
                raise ConfigError(f"--delta-weights {choice}: {error}") from None
            try:
                check_channel_weights(loaded, self.shapes)
            except ValueError as error:
                raise ConfigError(f"--delta-weights {choice} (layers {', '.join(self.layers)}): {error}") from None
            self.delta_info = {"method": "file", "path": choice}
            return loaded
        loader = torch.utils.data.DataLoader(
            self.data.train,
            batch_sampler=GlobalBatchSampler(
                len(self.data.train), self.config.batch_size, seed=self.config.seed, shuffle=True
            ),
            num_workers=self.config.workers,
        )
        weights = self.config.weights
        key_parts = {
            "arch": self.config.arch,
            "data": self.data.fingerprint,
            "image_size": self.config.image_size,
            "weights": weights if weights in ("imagenet", "none") else file_identity(weights),
            "seed": self.config.seed,
            "head_epochs": self.config.delta_head_epochs,
            "batches": self.config.delta_batches,
            "batch_size": self.config.batch_size,
        }
        started = time.perf_counter()
        result, info = compute_channel_weights(
            self.model,
            self.head,
            self.layers,
            loader,
            method=choice,
            head_epochs=self.config.delta_head_epochs,
            head_lr=self.stages[0].lr,
            score_batches=self.config.delta_batches,
            device=self.device,
            cache_dir=self.config.cache_dir,
            key_parts=key_parts,
            max_rows=self.config.eval_batch_size,
        )
        self.delta_info = dict(info, seconds=info.get("seconds", time.perf_counter() - started))
        self.log(
            f"DELTA channel weights ({choice}): {'cached' if info.get('cached') else 'computed'} "
            f"in {self.delta_info['seconds']:.1f} s"
        )
        return [w.float() for w in result]

    def _shared_delta_weights(self):
        """The DELTA weights: read from a file by every rank, or estimated by rank 0 alone and
        sent to the others (the estimate runs whole forward passes: once is enough)."""
        if not self.dist.enabled or self.config.delta_weights not in DELTA_ESTIMATES:
            return self._delta_weights()
        payload = [self._delta_weights(), self.delta_info] if self.dist.is_main else [None, None]
        torch.distributed.broadcast_object_list(payload, src=0)
        self.delta_info = payload[1]
        return payload[0]

    def _setup_stage(self, index: int) -> None:
        stage = self.stages[index]
        regularizer = REGULARIZERS[stage.reg]
        weights = None if self.channel_weights is None else [w.to(self.device) for w in self.channel_weights]
        build = regularizer.loss_module
        term = None if build is None else build(self.config.backend, self.shapes, weights).to(self.device)
        parameters = list(self.model.parameters()) + ([] if term is None else list(term.parameters()))
        optimizer = torch.optim.SGD(
            parameters, lr=stage.lr, momentum=self.config.momentum, weight_decay=self.config.weight_decay
        )
        milestone = max(1, round(self.config.lr_decay_at * self.epochs))
        self.current = StageSetup(
            stage,
            regularizer,
            term,
            optimizer,
            torch.optim.lr_scheduler.MultiStepLR(optimizer, [milestone], gamma=self.config.lr_gamma),
            source_parameters(self.source, self.head) if regularizer.reads_source_parameters else None,
            StepModule(self.model, self.forward_model, self.hooks, term),
        )

    def _wrapped_step(self) -> nn.Module:
        """The step module, in DistributedDataParallel under torchrun (made after any state is loaded)."""
        current = self.current
        if current.wrapped is None:
            if self.dist.enabled:
                ids = [self.device.index] if self.device.type == "cuda" else None
                current.wrapped = nn.parallel.DistributedDataParallel(current.step_module, device_ids=ids)
            else:
                current.wrapped = current.step_module
        return current.wrapped

    # ------------------------------------------------------------------ state

    def _checkpoint(self, state: RunState) -> None:
        if not self.dist.is_main:
            return
        checkpoint.save(
            self.out / CHECKPOINT,
            {
                "version": CHECKPOINT_VERSION,
                "state": state,
                "config": self.config.to_dict(),
                "model": self.model.state_dict(),
                "source": self.source.state_dict(),
                "term": None if self.current.term is None else self.current.term.state_dict(),
                "optimizer": self.current.optimizer.state_dict(),
                "scheduler": self.current.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": checkpoint.rng_states(),
            },
        )

    def _restore(self) -> RunState:
        another_version = f"--resume: {self.out / CHECKPOINT} was written by another version of the trainer"
        try:
            saved = checkpoint.load(self.out / CHECKPOINT)
        except (AttributeError, ModuleNotFoundError) as error:  # a class that this version does not have
            raise ConfigError(f"{another_version} ({error})") from None
        if not isinstance(saved, dict) or saved.get("version") != CHECKPOINT_VERSION:
            raise ConfigError(another_version)
        state: RunState = saved["state"]
        self.channel_weights = state.channel_weights
        self.delta_info = state.delta_info
        self.model.load_state_dict(saved["model"])
        self.source.load_state_dict(saved["source"])
        if state.stage < len(self.stages):
            self._setup_stage(state.stage)
            if self.current.term is not None:
                self.current.term.load_state_dict(saved["term"])
            self.current.optimizer.load_state_dict(saved["optimizer"])
            self.current.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        checkpoint.restore_rng_states(saved["rng"])
        return state

    # ------------------------------------------------------------------ run

    def run(self) -> dict:
        started = time.perf_counter()
        if self.resuming:
            state = self._restore()
            self.log(
                f"resuming {self.out}: stage {state.stage + 1}, {state.epoch} of {self.epochs} epochs "
                f"and {state.step} steps done"
            )
        else:
            if self.dist.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                checkpoint.atomic_write_text(self.out / CONFIG, to_toml(self.config))
            self.dist.barrier()
            state = RunState(channel_weights=self.channel_weights, delta_info=self.delta_info)
            self._setup_stage(0)
        self._clock = (state.elapsed, started)
        with _StopFlag() as stop:
            while state.stage < len(self.stages):
                self._run_stage(state, stop)
        result = self._finish(state)
        self.dist.barrier()  # no rank leaves the process group while another still uses it
        return result

    def _elapsed(self) -> float:
        """Seconds of this run, the sessions before a resumption included."""
        before, started = self._clock
        return before + time.perf_counter() - started

    def _run_stage(self, state: RunState, stop: _StopFlag) -> None:
        stage = self.current.stage
        while state.epoch < self.epochs:
            self._train_epoch(state, stop)
            self._check_finite(state)
            val_acc = self.evaluate(self.data.val)
            best = state.best
            if val_acc > best.val_acc:
                best.val_acc, best.epoch = val_acc, state.epoch + 1
                best.model = copy.deepcopy(self.model.state_dict())
                best.term = None if self.current.term is None else copy.deepcopy(self.current.term.state_dict())
            self._record_epoch(state, val_acc)
            self.current.scheduler.step()
            state.epoch, state.step, state.sums = state.epoch + 1, 0, EpochSums()
            state.elapsed = self._elapsed()
            self._checkpoint(state)
            if self._stop_agreed(stop):
                raise Interrupted(stop.signum or signal.SIGTERM, self.out / CHECKPOINT)
        best = state.best
        state.stage_results.append(
            StageResult(
                stage.reg,
                stage.lr,
                stage.alpha,
                self.epochs,
                self.epochs * len(self.sampler.global_batches()),
                best.epoch,
                best.val_acc,
            )
        )
        self.model.load_state_dict(best.model)
        state.stage, state.epoch, state.step = state.stage + 1, 0, 0
        if state.stage < len(self.stages):
            # The next stage starts from this stage's best model, which is also its source.
            self.source.load_state_dict(best.model)
            state.best = BestModel(best.val_acc, 0, best.model, None)
            self._setup_stage(state.stage)
            self.log(
                f"stage {state.stage + 1}: starting from the best stage-{state.stage} model "
                f"(val acc {best.val_acc:.4f}), which also becomes the source model"
            )

    def _check_finite(self, state: RunState) -> None:
        """Raise Diverged unless the epoch's losses and the model's weights and statistics after it are finite."""
        sums, stage = state.sums, self.current.stage
        terms = {"ce": sums.ce, "regulariser": sums.regularizer, "head L2": sums.head}
        tensors = list(self.model.state_dict().values())
        tensors += [] if self.current.term is None else list(self.current.term.state_dict().values())
        weights_finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors if t.is_floating_point()]).all())
        if weights_finite and all(math.isfinite(value) for value in terms.values()):
            return
        values = ", ".join(f"{name} {value}" for name, value in terms.items())
        if not weights_finite:
            values += ", and weights or batch-norm statistics that are not"
        flags = "--lr or --alpha" if state.stage == 0 else "--stage2-lr or --stage2-alpha"
        raise Diverged(
            f"stage {state.stage + 1} ({stage.reg}) epoch {state.epoch + 1}: the loss is not finite ({values}) "
            f"at alpha {stage.alpha:g} and lr {self.current.optimizer.param_groups[0]['lr']:g}; lower {flags}; "
            + (
                "the checkpoint of the epoch before is kept"
                if (self.out / CHECKPOINT).is_file()
                else "no checkpoint had been written"
            )
        )

    def _stop_agreed(self, stop: _StopFlag) -> bool:
        flag = torch.tensor([1.0 if stop.signum is not None else 0.0], device=self.device)  # NCCL: on the GPU
        return bool(distributed.all_reduce_sum(self.dist, flag).item() > 0)

    def _autocast(self):
        if self.config.amp is None:
            return nullcontext()
        dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _to_device(self, images):
        images = images.to(self.device, non_blocking=True)
        if self.config.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _train_epoch(self, state: RunState, stop: _StopFlag) -> None:
        stage = self.current.stage
        epoch, first_step, sums = state.epoch, state.step, state.sums
        self.sampler.set_epoch(epoch)
        self.data.train.set_epoch(epoch)
        global_batches = self.sampler.global_batches()
        local_batches = [batch[self.dist.rank :: self.dist.world] for batch in global_batches]
        loader = torch.utils.data.DataLoader(
            self.data.train,
            batch_sampler=local_batches[first_step:],
            num_workers=self.config.workers,
            pin_memory=self.device.type == "cuda",
            # its base seed from (seed, epoch), not the global RNG:
            # a resumed epoch must not draw it a second time
            generator=torch.Generator().manual_seed(mix_seed(self.config.seed, epoch)),
        )
        self.model.train()
        if self.current.term is not None:
            self.current.term.train()
        from tqdm import tqdm

        bar = tqdm(
            total=len(global_batches),
            initial=first_step,
            leave=False,
            dynamic_ncols=True,
            disable=not self.progress,
            desc=f"stage {state.stage + 1}/{len(self.stages)} ({stage.reg}) epoch {epoch + 1}/{self.epochs}",
        )
        device_sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        started = time.perf_counter()
        for step, (images, labels) in enumerate(loader, start=first_step):
            losses = self.train_step(images, labels, len(global_batches[step]))
            device_sums += torch.stack(
                [losses.ce.double(), losses.regularizer.double(), losses.head.double(), losses.correct.double()]
            )
            sums.steps += 1
            bar.update(1)
            if stop.signum is not None and not self.dist.enabled and step + 1 < len(global_batches):
                self._add_sums(sums, device_sums, started)
                state.step = step + 1
                state.elapsed = self._elapsed()
                self._checkpoint(state)
                bar.close()
                raise Interrupted(stop.signum, self.out / CHECKPOINT)
        bar.close()
        self._add_sums(sums, device_sums, started)

    def train_step(self, images, labels, global_batch: int) -> StepLosses:
        """One optimizer step on this rank's share of a global batch; returns its StepLosses."""
        images, labels = self._to_device(images), labels.to(self.device, non_blocking=True)
        mean_scale, sum_scale = distributed.loss_scales(self.dist, len(labels), global_batch)
        with self._autocast():
            with torch.no_grad():
                self.source(images)
                source_features = [f.detach() for f in self.source_hooks.features]
            logits, feature_term = self._wrapped_step()(images, source_features)
            current = self.current
            losses = step_losses(
                logits,
                labels,
                feature_term,
                regularizer=current.regularizer,
                alpha=current.stage.alpha,
                beta=self.config.beta,
                model=self.model,
                head=self.head,
                source_values=current.source_values,
                mean_scale=mean_scale,
                sum_scale=sum_scale,
                world=self.dist.world,
            )
        self.current.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses.total).backward()
        self.scaler.step(self.current.optimizer)
        self.scaler.update()
        self.hooks.clear()  # the feature maps are not kept beyond the step
        self.source_hooks.clear()
        return losses

    def _add_sums(self, sums: EpochSums, device_sums: torch.Tensor, started: float) -> None:
        """Fold this epoch's device-side sums (over ranks) into ``sums``: one sync per epoch."""
        reduced = distributed.all_reduce_sum(self.dist, device_sums).cpu().tolist()
        sums.ce += reduced[0]
        sums.regularizer += reduced[1]
        sums.head += reduced[2]
        sums.correct += int(round(reduced[3]))
        sums.seconds += time.perf_counter() - started

    def _record_epoch(self, state: RunState, val_acc: float) -> None:
        stage = self.current.stage
        sums = state.sums
        steps = max(sums.steps, 1)
        ce, regularizer, head = sums.ce / steps, sums.regularizer / steps, sums.head / steps
        seen = sum(len(batch) for batch in self.sampler.global_batches())
        record = EpochRecord(
            stage=state.stage + 1,
            reg=stage.reg,
            epoch=state.epoch + 1,
            lr=float(self.current.optimizer.param_groups[0]["lr"]),
            ce=ce,
            feature=regularizer,
            head_l2=head,
            total=ce + stage.alpha * regularizer + self.config.beta * head,
            train_acc=sums.correct / max(seen, 1),
            val_acc=val_acc,
            best_val_acc=max(state.best.val_acc, val_acc),
            seconds=sums.seconds,
        )
        state.records.append(record)
        if self.dist.is_main:
            write_metrics(self.out, state.records)
        self.log(
            f"stage {record.stage}/{len(self.stages)} ({record.reg}) epoch {record.epoch}/{self.epochs}: "
            f"lr {record.lr:.3g}  ce {ce:.4f}  regulariser {regularizer:.4g}  head {head:.4g}  "
            f"total {record.total:.4f}  train acc {record.train_acc:.4f}  val acc {val_acc:.4f}  "
            f"({sums.seconds:.1f} s)"
        )

    @torch.no_grad()
    def evaluate(self, split) -> float:
        """Top-1 accuracy of the target model on a split (each rank a share, summed)."""
        was_training = self.model.training
        self.model.eval()
        indices = list(range(self.dist.rank, len(split), self.dist.world))
        loader = torch.utils.data.DataLoader(
            split,
            batch_size=self.config.eval_batch_size,
            sampler=indices,
            num_workers=self.config.workers,
            generator=torch.Generator().manual_seed(self.config.seed),
        )
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        for images, labels in loader:
            images, labels = self._to_device(images), labels.to(self.device)
            with self._autocast():
                logits = self.forward_model(images)
            counts[0] += (logits.argmax(dim=1) == labels).sum()
            counts[1] += len(labels)
        self.model.train(was_training)
        correct, total = distributed.all_reduce_sum(self.dist, counts).cpu().tolist()
        return correct / max(total, 1)

    def _finish(self, state: RunState) -> dict:
        final = state.stage_results[-1]
        test_acc = self.evaluate(self.data.test)
        result = {
            "test_acc": test_acc,
            "best_val_acc": final.best_val_acc,
            "method": self.config.reg,
            "stages": [dataclasses.asdict(stage) for stage in state.stage_results],
            "epochs_per_stage": self.epochs,
            "epochs_run": sum(stage.epochs for stage in state.stage_results),
            "steps": sum(stage.steps for stage in state.stage_results),
            "wall_time_s": self._elapsed(),
            "backend": self.config.backend,
            "backends_available": afa_ext.available_backends(),
            "arch": self.config.arch,
            "layers": self.layers,
            "seed": self.config.seed,
            "data": self.config.data,
            "images": {"train": len(self.data.train), "val": len(self.data.val), "test": len(self.data.test)},
            "test_is_val": bool(getattr(self.data, "test_is_val", False)),
            "world_size": self.dist.world,
            "delta_weights": {k: v for k, v in (state.delta_info or {}).items() if k != "path"},
        }
        if self.dist.is_main:
            checkpoint.save(self.out / MODEL, self.model.state_dict())
            write_result(self.out, result)
            title = f"{self.config.data} {self.config.arch} {self.config.reg} seed {self.config.seed}"
            plots.save(
                plots.curves_figure(
                    [dataclasses.asdict(r) for r in state.records],
                    [stage.alpha for stage in self.stages],
                    self.config.beta,
                    title,
                ),
                self.out / CURVES,
            )
        self.log(
            f"test accuracy {test_acc:.4f} (best validation accuracy {final.best_val_acc:.4f}); results in {self.out}"
        )
        return result


def run(config: TrainConfig, *, log: Callable[[str], None] = print, progress: bool | None = None) -> dict:
    """Train as ``config`` says and return what result.json holds (on every rank)."""
    resolved = resolve_config(config)
    dist = distributed.setup(resolved.device)
    try:
        return Run(resolved, dist, log, progress).run()
    finally:
        distributed.teardown(dist)
