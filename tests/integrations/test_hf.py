"""corrtools.integrations.hf on a real transformers.Trainer (CPU, tiny models from configs, no download).

The reference for the store's values is an independent copy of the weights taken by a second
callback in on_step_end; for the loss, the trainer's own logs.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from corrtools import Reset, open_run
from corrtools.errors import CorrtoolsError
from _callback_reference import expected_values
from corrtools.integrations.hf import RecorderCallback, SparsifierCallback

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)

VOCAB = 64


def _data(n: int = 32, length: int = 16) -> list[dict[str, torch.Tensor]]:
    """Token ids made here (no tokenizer, no download); the labels are the inputs (causal LM)."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


class _Logs(TrainerCallback):
    """The trainer's training logs, and an independent copy of the weights after each step."""

    def __init__(self) -> None:
        self.logs: list[dict] = []
        self.at: dict[int, dict[str, np.ndarray]] = {}

    def _take(self, state, model) -> None:
        self.at[state.global_step] = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._take(state, model)

    def on_step_end(self, args, state, control, model=None, **kw):
        self._take(state, model)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.logs.append({"step": state.global_step, **logs})


def _train(tmp_path, model, callbacks, max_steps, resume=None, **kw) -> _Logs:
    seen = _Logs()
    kw.setdefault("save_strategy", "no")
    args = TrainingArguments(
        str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, log_level="error", **kw,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_data(), callbacks=[*callbacks, seen])
    trainer.train(resume_from_checkpoint=resume)
    return seen


def test_rows_values_and_loss_under_gradient_accumulation(tmp_path):
    plain = _train(tmp_path, _gpt2(), [], max_steps=4, gradient_accumulation_steps=2)
    path = tmp_path / "run.zarr"
    seen = _train(tmp_path, _gpt2(), [RecorderCallback(path, sample=0.1)], max_steps=4, gradient_accumulation_steps=2)

    # the callback changes no training result (GPT-2's dropout draws from the same RNG stream)
    assert [log["loss"] for log in seen.logs] == [log["loss"] for log in plain.logs]
    ds = open_run(path)
    assert ds.attrs["status"] == "complete" and ds.attrs["total_steps"] == 4
    np.testing.assert_array_equal(ds["step"].values, [1, 2, 3, 4])  # the trainer's global steps
    np.testing.assert_array_equal(ds["values"].values, expected_values(ds, seen.at, [1, 2, 3, 4]))
    np.testing.assert_array_equal(ds["initial"].values, expected_values(ds, seen.at, [0])[0])
    np.testing.assert_allclose(ds["loss"].values, [log["loss"] for log in seen.logs], rtol=1e-6)
    assert "transformer.h.0.attn.c_attn.weight" in set(ds["param"].values)  # Conv1D weights are recorded


def test_resume_from_checkpoint_continues_the_store_and_the_sparsifier(tmp_path):
    def callbacks(path):
        return [SparsifierCallback(density=0.25, exploit=Reset(every=3, reset_optimizer_state=True)),
                RecorderCallback(path, sample=32)]

    path = tmp_path / "run.zarr"
    first_cbs = callbacks(path)
    first = _train(tmp_path, _llama(), first_cbs, max_steps=4, save_strategy="steps", save_steps=2)
    whole = open_run(path)["values"].values.copy()
    assert first_cbs[0].sparsifier.steps_done == 4
    # the Sparsifier's metrics are in the training logs, for the callbacks after it
    log = first.logs[-1]
    assert log["sparsity/density"] == pytest.approx(0.25, abs=1e-3) and log["sparsity/z"] == 3.0
    report = {r.name: r for r in first_cbs[0].sparsifier.density_report()}
    for name in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"):
        assert log[f"sparsity/{name}/density"] == report[f"{name}.weight"].density
        assert log[f"sparsity/{name}/rewired"] == report[f"{name}.weight"].rewired_last

    cbs = callbacks(path)
    with pytest.warns(UserWarning, match="dropped 2 row"):
        _train(tmp_path, _llama(), cbs, max_steps=4, resume=str(tmp_path / "out" / "checkpoint-2"))
    ds = open_run(path)
    assert ds.attrs["status"] == "complete" and ds.attrs["resumed"] == [2]
    np.testing.assert_array_equal(ds["step"].values, [1, 2, 3, 4])
    np.testing.assert_array_equal(ds["values"].values, whole)  # steps 3, 4 again, bit for bit
    assert cbs[0].sparsifier.steps_done == 4  # 2 restored from the checkpoint + 2 taken
    assert [r.rewired_total for r in cbs[0].sparsifier.density_report()] == [r.rewired_total for r in report.values()]


def test_errors_are_one_sentence_before_training(tmp_path):
    with pytest.raises(CorrtoolsError, match="(?i)structure"):
        SparsifierCallback(structure="3:2")
    (tmp_path / "run.zarr").mkdir()
    with pytest.raises(CorrtoolsError, match="overwrite=True"):
        _train(tmp_path, _llama(), [RecorderCallback(tmp_path / "run.zarr")], max_steps=1)
    args = TrainingArguments(str(tmp_path / "o"), report_to="none", use_cpu=True,
                             restore_callback_states_from_checkpoint=True)
    with pytest.raises(CorrtoolsError, match="restore_callback_states_from_checkpoint"):
        Trainer(model=_llama(), args=args, train_dataset=_data(), callbacks=[SparsifierCallback()])
