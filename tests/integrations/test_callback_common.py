"""The framework-free parts of the callbacks: the metrics they log, the loss of a step."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from corrtools.integrations._common import LossMeter, latest_z, sparsity_metrics
from corrtools.sparse import Reset, Sparsifier


@dataclass
class _Estimate:  # the fields of an auto-z estimate that the callbacks read
    step: int
    z: int | None


def test_metrics_per_layer_and_z_from_the_history():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.Linear(16, 2))
    sp = Sparsifier(model, density=0.25, allocation="uniform", exploit=Reset(every=7))
    metrics = sparsity_metrics(sp)
    assert metrics == {
        "sparsity/0/density": 0.25, "sparsity/0/rewired": 0.0,
        "sparsity/2/density": 0.25, "sparsity/2/rewired": 0.0,
        "sparsity/density": 0.25, "sparsity/z": 7.0,
    }
    # Reset(every="auto") keeps its choices in sp.z_history; a stand-in with the same attributes
    history = [_Estimate(100, 40), _Estimate(200, 55), _Estimate(300, None)]  # None: z unchanged
    auto = SimpleNamespace(config=sp.config, density_report=sp.density_report, z_history=history)
    assert latest_z(auto) == 55 and sparsity_metrics(auto)["sparsity/z"] == 55.0
    assert latest_z(SimpleNamespace(config=sp.config, z_history=[])) == 7


def test_loss_meter_means_the_micro_batches_of_a_step():
    meter = LossMeter()
    assert meter.take() is None
    for loss in (torch.tensor(1.0), 2.0, None, torch.tensor(6.0)):
        meter.add(loss)
    assert meter.take() == pytest.approx(3.0)
    assert meter.take() is None
