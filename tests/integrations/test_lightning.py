"""corrtools.integrations.lightning on a real lightning.Trainer (CPU, tiny model, a few steps).

The reference for the store's values is an independent copy of the weights taken by a second
callback whenever trainer.global_step moves; for the loss, the losses the module itself saw.
"""
from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from corrtools import Reset, open_run
from corrtools.errors import CorrtoolsError
from _callback_reference import expected_values
from corrtools.integrations.lightning import RecorderCallback, SparsifierCallback

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)


def _data(n_batches: int = 4, batch: int = 8) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n_batches * batch, 12, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2] + 0.1 * torch.randn(n_batches * batch, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


class _Net(L.LightningModule):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
        self.losses: list[float] = []  # every training_step's loss, as the module computed it
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.trainer.global_step == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class _Snapshots(L.Callback):
    """An independent copy of every parameter after each optimizer step, by trainer.global_step."""

    def __init__(self) -> None:
        self.at: dict[int, dict[str, np.ndarray]] = {}

    def _take(self, trainer, pl_module) -> None:
        self.at[trainer.global_step] = {n: p.detach().numpy().copy() for n, p in pl_module.named_parameters()}

    def on_train_start(self, trainer, pl_module) -> None:
        self._take(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step not in self.at:
            self._take(trainer, pl_module)


def _trainer(tmp_path: Path, callbacks: list, max_steps: int, **kw) -> L.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_steps=max_steps, callbacks=callbacks, accelerator="cpu", devices=1, default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, **kw,
    )


def test_rows_values_and_loss_under_gradient_accumulation(tmp_path):
    # without the callback: the reference training result
    plain = _Net()
    _trainer(tmp_path, [], max_steps=6, accumulate_grad_batches=2).fit(plain, _data())
    net, snaps = _Net(), _Snapshots()
    rec_cb = RecorderCallback(tmp_path / "run.zarr", sample=0.25, seed=3)
    _trainer(tmp_path, [rec_cb, snaps], max_steps=6, accumulate_grad_batches=2).fit(net, _data())

    assert net.losses == plain.losses  # the callback changes no training result (exact)
    assert len(net.losses) == 12
    ds = open_run(tmp_path / "run.zarr")
    assert ds.attrs["status"] == "complete" and ds.attrs["total_steps"] == 6
    np.testing.assert_array_equal(ds["step"].values, np.arange(1, 7))  # one row per optimizer step
    np.testing.assert_array_equal(ds["values"].values, expected_values(ds, snaps.at, range(1, 7)))
    np.testing.assert_array_equal(ds["initial"].values, expected_values(ds, snaps.at, [0])[0])
    np.testing.assert_array_equal(ds["final"].values, expected_values(ds, snaps.at, [6])[0])
    # loss of step s: the mean of its two micro-batch losses, as training_step computed them
    want = np.asarray(net.losses, dtype=np.float64).reshape(6, 2).mean(axis=1)
    np.testing.assert_allclose(ds["loss"].values, want, rtol=1e-6)
    assert set(ds["param"].values) == {"net.0.weight", "net.2.weight", "net.4.weight"}


def test_exception_leaves_a_recording_store_and_resume_continues_it(tmp_path):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    path = tmp_path / "run.zarr"
    crashing = _Net(fail_at=5)
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, [RecorderCallback(path, sample=16), ckpt], max_steps=8,
                 enable_checkpointing=True).fit(crashing, _data())
    ds = open_run(path)
    assert ds.attrs["status"] == "recording"  # not a finished fit
    np.testing.assert_array_equal(ds["step"].values, [1, 2, 3, 4, 5])  # every row kept
    ckpt4 = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert ckpt4.exists()
    before = ds["values"].values[:4].copy()

    net, snaps = _Net(), _Snapshots()
    with pytest.warns(UserWarning, match="dropped 1 row"):
        _trainer(tmp_path, [RecorderCallback(path, sample=16), snaps], max_steps=8).fit(
            net, _data(), ckpt_path=ckpt4
        )
    ds = open_run(path)
    assert ds.attrs["status"] == "complete" and ds.attrs["resumed"] == [4]
    np.testing.assert_array_equal(ds["step"].values, np.arange(1, 9))
    np.testing.assert_array_equal(ds["values"].values[:4], before)  # the rows up to the checkpoint stay
    np.testing.assert_array_equal(ds["values"].values[4:], expected_values(ds, snaps.at, range(5, 9)))


def test_resumed_sparse_fit_equals_the_uninterrupted_one(tmp_path):
    """Masks and counters travel in the checkpoint: resuming at an epoch boundary (4 batches per
    epoch, so the data order is the same) reproduces the uninterrupted run's weights exactly."""
    def callbacks(path):
        return [SparsifierCallback(density=0.25, exploit=Reset(every=3, reset_optimizer_state=True)),
                RecorderCallback(path, sample=64)]

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    whole = tmp_path / "whole.zarr"
    cbs = callbacks(whole)
    _trainer(tmp_path, [*cbs, ckpt], max_steps=8, enable_checkpointing=True).fit(_Net(), _data())
    assert cbs[0].sparsifier.steps_done == 8
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)
    state = saved["callbacks"]["SparsifierCallback"]["sparsifier"]
    assert state["step"] == 4
    kept = sum(saved["state_dict"][f"net.{i}.weight_mask"].sum().item() for i in (0, 2))
    assert kept == round(0.25 * (12 * 32 + 32 * 32))  # the masks are in the checkpoint

    # the same run, stopped after the checkpoint and resumed from it into a copy of its store
    part = tmp_path / "part.zarr"
    _trainer(tmp_path, callbacks(part), max_steps=4).fit(_Net(), _data())
    net = _Net()
    cbs2 = callbacks(part)
    seen = {}

    class _AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["steps_done"] = cbs2[0].sparsifier.steps_done
            seen["mask"] = pl_module.net[0].weight_mask.clone()

    _trainer(tmp_path, [*cbs2, _AtStart()], max_steps=8).fit(net, _data(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert seen["steps_done"] == 4
    assert torch.equal(seen["mask"], saved["state_dict"]["net.0.weight_mask"])
    a, b = open_run(whole), open_run(part)
    np.testing.assert_array_equal(b["step"].values, np.arange(1, 9))
    np.testing.assert_array_equal(a["values"].values, b["values"].values)
    assert cbs2[0].sparsifier.density_report()[0].rewired_total == cbs[0].sparsifier.density_report()[0].rewired_total


class _TwoOptimizers(_Net):
    """Manual optimization: optimizer 0 steps every batch, optimizer 1 every second batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt0, opt1 = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        opt0.zero_grad(); opt1.zero_grad()
        self.manual_backward(loss)
        opt0.step()
        if batch_idx % 2 == 1:
            opt1.step()
        return loss

    def configure_optimizers(self):
        return (torch.optim.SGD(self.net[:2].parameters(), lr=0.05), torch.optim.SGD(self.net[2:].parameters(), lr=0.05))


def test_several_optimizers_follow_the_chosen_one(tmp_path):
    net = _TwoOptimizers()
    trainer = _trainer(tmp_path, [RecorderCallback(tmp_path / "run.zarr", sample=8, optimizer=1)], max_steps=12)
    trainer.fit(net, _data(n_batches=8))
    assert len(net.losses) == 8 and trainer.global_step == 12  # Lightning counts both optimizers' steps
    ds = open_run(tmp_path / "run.zarr")
    np.testing.assert_array_equal(ds["step"].values, [1, 2, 3, 4])  # the steps of optimizer 1
    # a row's loss: the mean over the batches since the followed optimizer's previous step
    want = np.asarray(net.losses, dtype=np.float64).reshape(4, 2).mean(axis=1)
    np.testing.assert_allclose(ds["loss"].values, want, rtol=1e-6)
    with pytest.raises(CorrtoolsError, match="optimizer=2"):
        _trainer(tmp_path, [RecorderCallback(tmp_path / "r2.zarr", optimizer=2)], max_steps=1).fit(
            _TwoOptimizers(), _data()
        )


def test_sparsifier_callback_logs_density_rewired_and_z(tmp_path):
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="logs")
    cb = SparsifierCallback(density=0.25, exploit=Reset(every=2))
    _trainer(tmp_path, [cb], max_steps=4, logger=logger, log_every_n_steps=1).fit(_Net(), _data())
    logger.finalize("success")
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    sparse = [r for r in rows if r.get("sparsity/net.0/density")]
    assert [int(r["step"]) for r in sparse] == [1, 2, 3, 4]
    assert {round(float(r["sparsity/density"]), 3) for r in sparse} == {0.25}  # one global threshold
    assert {float(r["sparsity/z"]) for r in sparse} == {2.0}
    last = {r.name: r for r in cb.sparsifier.density_report()}
    for layer in ("net.0", "net.2"):
        assert float(sparse[-1][f"sparsity/{layer}/density"]) == pytest.approx(last[f"{layer}.weight"].density)
        assert float(sparse[-1][f"sparsity/{layer}/rewired"]) == last[f"{layer}.weight"].rewired_last
    assert "sparsity/net.4/density" not in rows[0]  # the output layer stays dense


def test_bad_arguments_fail_before_training(tmp_path):
    with pytest.raises(CorrtoolsError, match="density"):
        SparsifierCallback(density=1.5)
    with pytest.raises(CorrtoolsError, match="every"):
        RecorderCallback(tmp_path / "r.zarr", every=0)
    (tmp_path / "exists.zarr").mkdir()
    with pytest.raises(CorrtoolsError, match="overwrite=True"):
        _trainer(tmp_path, [RecorderCallback(tmp_path / "exists.zarr")], max_steps=1).fit(_Net(), _data())


def test_import_corrtools_imports_no_framework():
    import subprocess
    import sys

    code = ("import sys, corrtools, corrtools.integrations, corrtools.record, corrtools.sparse; "
            "print(sorted(m for m in ('lightning', 'transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_records_to_an_fsspec_url(tmp_path):
    url = "memory://corrtools-lightning-test/run.zarr"
    try:
        _trainer(tmp_path, [RecorderCallback(url, sample=8)], max_steps=3).fit(_Net(), _data())
        ds = open_run(url)
        assert ds["step"].values.tolist() == [1, 2, 3] and ds.attrs["status"] == "complete"
    finally:
        import fsspec

        fsspec.filesystem("memory").rm("/corrtools-lightning-test", recursive=True)
