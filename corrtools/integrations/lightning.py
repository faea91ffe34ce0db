"""Lightning (2.x) callbacks: record a fit into a run store, train it sparse with Algorithm 1.

    trainer = lightning.Trainer(callbacks=[RecorderCallback("run.zarr", sample=2048)])

Steps. Both callbacks follow one optimizer: ``trainer.optimizers[optimizer]`` (default 0, the only
one under automatic optimization). A row is taken, and the Sparsifier steps, right after every
``step()`` that optimizer really takes, through a step post-hook: under gradient accumulation once
per ``accumulate_grad_batches`` batches, with several optimizers (manual optimization) once per
step of the followed one, and not for a step that AMP's ``GradScaler`` skipped. The store's
``step`` is the followed optimizer's step count (with one optimizer: ``trainer.global_step``).
When a Sparsifier and a Recorder follow the same optimizer, the row shows the weights after the
Sparsifier's step (exploitation and rewiring), i.e. those of the next forward pass.

Loss. The store's ``loss`` of step s is the mean of the training loss over the batches since the
followed optimizer's previous step (under accumulation: that step's micro-batches): the loss
``training_step`` returned (un-normalized by accumulation), or, when it returns none under that
name, the metric logged with ``self.log(name, ...)`` on the step (also read as ``<name>_step``).

Lifecycle. The store is created (or continued) in ``on_train_start``, flushed whenever a checkpoint
is saved, and closed in ``on_train_end`` with status "complete"; after an exception, an interrupt
or a teardown without ``on_train_end`` it is closed with its rows and stays "recording". Resuming
``trainer.fit(..., ckpt_path=...)`` continues the same store after the checkpoint's step (rows of
steps after the checkpoint, from the run that went on past it, are dropped with a warning). Only
global rank 0 records.

Sparsifier. Built in ``setup`` (before a checkpoint is restored, so that its masks, which are buffers
of the model, load with the model's state dict); its step and rewiring counts are this callback's
checkpoint state. Per-layer density and rewired count (and RESET's z) go to ``trainer.loggers``
every ``log_every_n_steps`` steps.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from corrtools.errors import CorrtoolsError
from corrtools.integrations._common import (
    LossMeter,
    build_sparsifier,
    follow_optimizer,
    open_recorder,
    recorder_options,
    sparsifier_options,
    sparsity_metrics,
)
from corrtools.record._location import store_path
from corrtools.record.sampling import ParamFilter, SampleSpec

__all__ = ["RecorderCallback", "SparsifierCallback"]


def _followed(trainer: pl.Trainer, index: int) -> torch.optim.Optimizer:
    optimizers = trainer.optimizers
    if not 0 <= index < len(optimizers):
        raise CorrtoolsError(
            f"optimizer={index} but the LightningModule configures {len(optimizers)} optimizer(s); "
            f"pass an index below {len(optimizers)}"
        )
    return optimizers[index]


def _check_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise CorrtoolsError(f"optimizer={index!r} must be the index of an optimizer in trainer.optimizers")
    return index


class RecorderCallback(pl.Callback):
    """Record sampled weights of the LightningModule after each optimizer step into ``path``.

    ``sample``, ``every``, ``params``, ``seed``, ``chunk_steps``, ``compressor``: as for
    `corrtools.Recorder`. ``optimizer``: index of the followed optimizer in ``trainer.optimizers``.
    ``loss``: name of the training loss (see the module docstring), None to store no loss.
    ``overwrite``: replace an existing store when a fit starts from step 0.
    """

    def __init__(
        self,
        path: str | Path,
        sample: SampleSpec = 4096,
        every: int = 1,
        params: ParamFilter = None,
        seed: int = 0,
        *,
        optimizer: int = 0,
        loss: str | None = "loss",
        overwrite: bool = False,
        chunk_steps: int | None = None,
        compressor: str = "auto",
    ) -> None:
        self.path = store_path(path)  # a folder, or an fsspec URL kept as it is
        self.optimizer = _check_index(optimizer)
        self.loss = loss
        self.overwrite = overwrite
        self._kwargs = recorder_options(sample, every, params, seed, chunk_steps, compressor)
        self.recorder: Any = None  # the corrtools.Recorder while a fit runs
        self._resume_step: int | None = None  # from a checkpoint of this callback
        self._seen = 0  # the recorder's step at the last on_train_batch_end
        self._meter = LossMeter()

    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}[{self.path}]"

    # ------------------------------------------------------------------ opening and the step
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        step = self._resume_step if self._resume_step is not None else trainer.global_step
        self.recorder = open_recorder(
            pl_module, self.path, step, self._kwargs, self.overwrite, "resume the fit from a checkpoint (ckpt_path=...)"
        )
        self.recorder.attach(_followed(trainer, self.optimizer))
        self._seen = self.recorder.step
        self._meter = LossMeter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        rec = self.recorder
        if rec is None or rec.closed:
            return
        if self.loss is not None:
            self._meter.add(self._batch_loss(trainer, outputs))
        if rec.step != self._seen:  # the followed optimizer stepped during this batch
            self._seen = rec.step
            loss = self._meter.take()
            if loss is not None:
                rec.log(loss=loss)

    def _batch_loss(self, trainer: pl.Trainer, outputs: Any) -> torch.Tensor | float | None:
        key = self.loss
        value = outputs.get(key) if isinstance(outputs, Mapping) else (outputs if key == "loss" else None)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            if trainer.lightning_module.automatic_optimization:
                value = value * trainer.accumulate_grad_batches  # Lightning divided it by that
            return value
        metrics = trainer.callback_metrics
        for name in (key, f"{key}_step"):
            logged = metrics.get(name)
            if isinstance(logged, torch.Tensor) and logged.numel() == 1:
                return logged
        return None

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.recorder is not None and not self.recorder.closed:
            self.recorder.flush()  # a run resumed from this checkpoint finds every row up to it

    def state_dict(self) -> dict[str, Any]:
        rec = self.recorder
        return {"step": None if rec is None else int(rec.step), "path": str(self.path)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        step = state_dict.get("step")
        self._resume_step = None if step is None else int(step)

    # ------------------------------------------------------------------ the end
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rec, self.recorder = self.recorder, None
        if rec is not None and not rec.closed:
            rec.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_incomplete(exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_incomplete(None)

    def _close_incomplete(self, exception: BaseException | None) -> None:
        """Keep the rows, leave the store "recording" (resumable); never raise over ``exception``."""
        rec, self.recorder = self.recorder, None
        if rec is None or rec.closed:
            return
        err = exception if exception is not None else CorrtoolsError("the fit ended without on_train_end")
        rec.__exit__(type(err), err, err.__traceback__)


class SparsifierCallback(pl.Callback):
    """Train the LightningModule sparse with Algorithm 1 (`corrtools.sparse.Sparsifier`).

    ``density``, ``structure``, ``exploit`` and ``**options`` (``rewire_every``, ``grad_scale``,
    ``total_steps``, ``include``, ``exclude``, ...) are the Sparsifier's; ``Fix`` without
    ``total_steps`` uses ``trainer.max_steps``, else ``trainer.estimated_stepping_batches``.
    ``optimizer``: index of the followed optimizer in ``trainer.optimizers``. ``log_every``: log the
    metrics every that many steps (default: the trainer's ``log_every_n_steps``; 0: never).
    ``callback.sparsifier`` is the Sparsifier (call ``finalize()`` on it for a plain model).
    """

    def __init__(
        self,
        density: float | None = None,
        structure: str = "unstructured",
        exploit: Any = None,
        *,
        optimizer: int = 0,
        log_every: int | None = None,
        **options: Any,
    ) -> None:
        self._kwargs = sparsifier_options(density, structure, exploit, options)
        self.optimizer = _check_index(optimizer)
        if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0):
            raise CorrtoolsError(f"log_every={log_every!r} must be a whole number of steps >= 0")
        self.log_every = log_every
        self.sparsifier: Any = None
        self._hook: Any = None
        self._log_hook: Any = None
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.sparsifier is not None:
            return
        planned = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if planned is None and "total_steps" not in self._kwargs:
            from corrtools.sparse.exploit import Fix

            if isinstance(self._kwargs.get("exploit"), Fix):
                planned = trainer.estimated_stepping_batches
        self.sparsifier = build_sparsifier(pl_module, self._kwargs, planned)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hook()
        self._hook = follow_optimizer(self.sparsifier, _followed(trainer, self.optimizer))
        self._log_hook = _followed(trainer, self.optimizer).register_step_post_hook(lambda *a: self._log())
        self._trainer = trainer

    def _log(self) -> None:
        sp, trainer = self.sparsifier, self._trainer
        assert trainer is not None  # set with the hook
        every = trainer.log_every_n_steps if self.log_every is None else self.log_every
        if every and sp.steps_done % every == 0 and trainer.loggers and trainer.is_global_zero:
            metrics = sparsity_metrics(sp)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=sp.steps_done)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.sparsifier is None else {"sparsifier": self.sparsifier.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "sparsifier" in state_dict and self.sparsifier is not None:
            self.sparsifier.load_state_dict(state_dict["sparsifier"])

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hook()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hook()

    def _remove_hook(self) -> None:
        for hook in (self._hook, self._log_hook):
            if hook is not None:
                hook.remove()
        self._hook = self._log_hook = None
