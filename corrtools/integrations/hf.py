"""Hugging Face ``transformers.Trainer`` callbacks: record a run into a store, train it sparse.

    trainer = Trainer(model, args, train_dataset=ds, callbacks=[RecorderCallback("run.zarr")])

Steps. The store's ``step`` is the trainer's ``state.global_step``: a row is taken in ``on_step_end``
of every step that is a multiple of ``every`` (under gradient accumulation, once per optimizer
step). The Sparsifier steps right after every ``step()`` the optimizer really takes (a step hook on
the torch optimizer inside accelerate's wrapper), so before the row of that step is taken.

Loss. The store's ``loss`` at step s is the ``loss`` of the trainer's log at s: the mean training loss
over the ``logging_steps`` steps since the previous log (NaN at steps without a log; set
``logging_steps=1`` for the loss of every step).

Lifecycle. The store is created in ``on_train_begin`` (continued when training resumes from a
checkpoint, ``trainer.train(resume_from_checkpoint=...)``: rows after the checkpoint's step, from the
run that went on past it, are dropped with a warning), flushed at every ``on_save`` and closed with
status "complete" in ``on_train_end``. The Trainer calls no callback when training raises: the store
then keeps the rows written (all of them up to the last checkpoint) and stays "recording", ready to
be continued. Only the world-process-zero records.

Sparsifier. Built in ``on_init_end`` (when the Trainer is made, before a checkpoint is loaded, so that
its masks, buffers of the model, load with the model's weights). Its step and rewiring counts
travel in the checkpoint's ``trainer_state.json`` (``stateful_callbacks``); leave the Trainer's
``restore_callback_states_from_checkpoint`` at False, the callback restores itself. Per-layer
density and rewired count (and RESET's z) are added to the ``logs`` of each training log, where the
callbacks after this one (the console printer) see them; logging integrations (TensorBoard, W&B)
run before the callbacks passed to the Trainer, so put this one first to reach them:
``trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(SparsifierCallback))``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from corrtools.errors import CorrtoolsError
from corrtools.integrations._common import (
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


class RecorderCallback(TrainerCallback):
    """Record sampled weights of the Trainer's model after each optimizer step into ``path``.

    ``sample``, ``every``, ``params``, ``seed``, ``chunk_steps``, ``compressor``: as for
    `corrtools.Recorder`. ``overwrite``: replace an existing store when training starts from step 0.
    """

    def __init__(
        self,
        path: str | Path,
        sample: SampleSpec = 4096,
        every: int = 1,
        params: ParamFilter = None,
        seed: int = 0,
        *,
        overwrite: bool = False,
        chunk_steps: int | None = None,
        compressor: str = "auto",
    ) -> None:
        self.path = store_path(path)  # a folder, or an fsspec URL kept as it is
        self.overwrite = overwrite
        self._kwargs = recorder_options(sample, every, params, seed, chunk_steps, compressor)
        self.recorder: Any = None  # the corrtools.Recorder while training runs

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        if self.recorder is not None and not self.recorder.closed:  # train() again after a crash in this process
            self.recorder.__exit__(RuntimeError, RuntimeError("train() restarted"), None)
        self.recorder = open_recorder(
            model, self.path, state.global_step, self._kwargs, self.overwrite,
            "resume training with trainer.train(resume_from_checkpoint=...)",
        )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.record(step=state.global_step)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: Any = None, **kwargs: Any
    ) -> None:
        if self.recorder is not None and logs and "loss" in logs and state.global_step > 0:
            self.recorder.log(loss=float(logs["loss"]), step=state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.flush()  # a run resumed from this checkpoint finds every row up to it

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        rec, self.recorder = self.recorder, None
        if rec is not None:
            rec.close()


class SparsifierCallback(TrainerCallback, ExportableState):
    """Train the Trainer's model sparse with Algorithm 1 (`corrtools.sparse.Sparsifier`).

    ``density``, ``structure``, ``exploit`` and ``**options`` (``rewire_every``, ``grad_scale``,
    ``total_steps``, ``include``, ``exclude``, ...) are the Sparsifier's; ``Fix`` without
    ``total_steps`` uses the Trainer's ``max_steps``. ``log``: add the metrics to the training logs.
    ``callback.sparsifier`` is the Sparsifier (call ``finalize()`` on it for a plain model).
    """

    def __init__(
        self,
        density: float | None = None,
        structure: str = "unstructured",
        exploit: Any = None,
        *,
        log: bool = True,
        **options: Any,
    ) -> None:
        self._kwargs = sparsifier_options(density, structure, exploit, options)
        self.log = log
        self.sparsifier: Any = None
        self._hook: Any = None

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        if args.restore_callback_states_from_checkpoint:
            raise CorrtoolsError(
                "SparsifierCallback restores its own state from a checkpoint; leave the Trainer's "
                "restore_callback_states_from_checkpoint at False"
            )
        if self.sparsifier is None:
            self.sparsifier = build_sparsifier(model, self._kwargs, args.max_steps if args.max_steps > 0 else None)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.sparsifier is None:  # added after the Trainer was made: checkpoint masks were not loaded
            self.sparsifier = build_sparsifier(model, self._kwargs, state.max_steps)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, dict) and "sparsifier" in saved.get("attributes", {}):
            self.sparsifier.load_state_dict(saved["attributes"]["sparsifier"])
        if self._hook is not None:
            self._hook.remove()
        self._hook = follow_optimizer(self.sparsifier, optimizer)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: Any = None, **kwargs: Any
    ) -> None:
        if self.log and self.sparsifier is not None and isinstance(logs, dict) and "loss" in logs:
            logs.update(sparsity_metrics(self.sparsifier))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def state(self) -> dict[str, Any]:
        """The checkpoint's copy of the Sparsifier's step and counts (JSON, in trainer_state.json)."""
        attributes = {} if self.sparsifier is None else {"sparsifier": self.sparsifier.state_dict()}
        return {"args": {}, "attributes": attributes}
