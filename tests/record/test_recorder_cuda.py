"""The Recorder on a CUDA GPU: the device staging buffer, pinned host blocks, the non-blocking copy
and the CUDA event the writer waits on. Skipped without CUDA (CI has none); run on a GPU machine
with ``GPU_CHECK_ONLY=tests bash benchmarks/gpu_check.sh``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from corrtools import Recorder, open_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 256), nn.ReLU(), nn.Linear(256, 64)).to("cuda", dtype)


@pytest.mark.parametrize("layout", ["strided", "runs", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_rows_equal_the_weights_after_each_step(tmp_path, layout, dtype):
    """Every stored row equals an independent host copy of the weights taken after that step,
    across several blocks (chunk_steps=8, so the ring of pinned blocks is reused), and the store
    gets lz4 (the "auto" codec for accelerator parameters)."""
    model = _model(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(32, 96, device="cuda", dtype=dtype)
    copies = {}
    with Recorder(model, tmp_path / "c.zarr", sample=200, layout=layout, chunk_steps=8).attach(opt) as rec:
        assert all(g.staging is not None and g.device.type == "cuda" for g in rec._groups)
        assert rec._free.queue[0].tensor.is_pinned()
        for step in range(1, 41):
            loss = model(x).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            copies[step] = {n: p.detach().float().cpu() for n, p in model.named_parameters()}
            rec.log(loss=loss.item())
    ds = open_run(tmp_path / "c.zarr")
    names, index = ds["param"].values, ds["index"].values
    assert ds["step"].values.tolist() == list(range(1, 41))
    for r, s in enumerate(ds["step"].values):
        want = np.array([copies[s][n].flatten()[i].item() for n, i in zip(names, index)], dtype=np.float32)
        np.testing.assert_array_equal(ds["values"].values[r], want)
    codecs = [c["name"] for c in json.loads((tmp_path / "c.zarr" / "values" / "zarr.json").read_text())["codecs"]]
    assert "blosc" in codecs and codecs[-1] == "crc32c"


def test_cuda_recording_does_not_synchronize_the_training_loop(tmp_path):
    """The hook queues a gather and a non-blocking copy; no step of the loop may wait for the GPU
    (torch's sync debug mode turns any synchronizing call into an error). Block hand-overs included:
    chunk_steps=4 over 24 steps."""
    model = _model(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(32, 96, device="cuda")
    with Recorder(model, tmp_path / "s.zarr", sample=300, chunk_steps=4).attach(opt) as rec:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(24):
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        final = {n: p.detach().cpu() for n, p in model.named_parameters()}
    ds = open_run(tmp_path / "s.zarr")
    assert ds.sizes["step"] == 24
    names, index = ds["param"].values, ds["index"].values
    want = np.array([final[n].flatten()[i].item() for n, i in zip(names, index)], dtype=np.float32)
    np.testing.assert_array_equal(ds["values"].values[-1], want)
    np.testing.assert_array_equal(ds["final"].values, want)
