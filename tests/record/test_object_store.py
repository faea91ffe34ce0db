"""Run stores on fsspec URLs: s3:// against a local moto server (as s3fs's own tests do), memory://."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from corrtools import Recorder
from corrtools.analysis.delta import delta_by_magnitude
from corrtools.cli import main
from corrtools.errors import CorrtoolsError
from corrtools.record.store import RunWriter, open_run, run_info

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
REPO = Path(__file__).resolve().parents[2]
_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and fsspec configured for it; yields (bucket, environment)."""
    import fsspec
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved_env = {k: os.environ.get(k) for k in _CREDENTIALS}
    os.environ.update(_CREDENTIALS)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    s3fs.S3FileSystem.clear_instance_cache()
    fsspec.filesystem("s3").mkdir("runs")
    env = {**os.environ, **_CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL": endpoint, "PYTHONPATH": str(REPO)}
    try:
        yield "runs", env
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _train_twice(url: str, local: Path) -> None:
    """One training run recorded into `url` and into the local `local` (same model, same steps)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Recorder(model, url, sample=40, chunk_steps=8).attach(opt) as remote, \
            Recorder(model, local, sample=40, chunk_steps=8).attach(opt) as here:
        for _ in range(30):
            loss = model(torch.randn(8, 16)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            remote.log(loss=loss.item())
            here.log(loss=loss.item())


def _same_run(a, b) -> None:
    for name in ("step", "param", "index", "initial", "final", "values", "loss", "lr"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


@pytest.mark.parametrize("scheme", ["s3", "memory"])
def test_record_to_and_analyse_from_a_url(scheme, s3, tmp_path, capsys):
    url = f"s3://{s3[0]}/r-{uuid.uuid4().hex[:8]}.zarr" if scheme == "s3" else f"memory://r-{uuid.uuid4().hex[:8]}.zarr"
    _train_twice(url, tmp_path / "local.zarr")
    remote, local = open_run(url), open_run(tmp_path / "local.zarr")
    assert remote.attrs["status"] == "complete"
    _same_run(remote, local)
    res_remote = delta_by_magnitude(url, bins=3, n_boot=50, progress=False)
    res_local = delta_by_magnitude(tmp_path / "local.zarr", bins=3, n_boot=50, progress=False)
    np.testing.assert_array_equal(res_remote["median_delta"].values, res_local["median_delta"].values)
    info = run_info(url)
    assert info["path"] == url and info["steps_written"] == 30 and info["writer"] is None
    assert info["size_bytes"] > 30 * 80 * 4  # the values alone
    assert main(["info", url]) == 0
    assert "status      complete" in capsys.readouterr().out
    with pytest.raises(CorrtoolsError, match="already exists; pass overwrite=True"):
        Recorder(torch.nn.Linear(4, 4), url, sample=4)
    Recorder(torch.nn.Linear(4, 4), url, sample=4, overwrite=True, layout="uniform").close()
    assert open_run(url).sizes["weight"] == 4


def test_lock_object_refuses_a_second_writer(s3):
    url = f"s3://{s3[0]}/lock.zarr"
    w = RunWriter.create(url, param=["p"] * 3, index=np.arange(3), initial=np.zeros(3))
    with pytest.raises(CorrtoolsError, match=r"being recorded by pid \d+ on .*lock.zarr/step/writer.lock"):
        RunWriter.resume(url)
    assert run_info(url)["writer"].startswith(f"pid {os.getpid()}")
    w.close(np.ones(3), 0)
    assert run_info(url)["writer"] is None
    RunWriter.resume(url).close(np.ones(3), 0)  # free again after close


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from corrtools.record.store import RunWriter
    N = 300
    w = RunWriter.create(sys.argv[1], param=["p"] * N, index=np.arange(N), initial=np.zeros(N),
                         chunk_steps=8, chunk_weights=100)
    base = np.arange(N, dtype=np.float32) / N
    s = 0
    while True:
        k = 3 + s % 7
        steps = np.arange(s, s + k)
        w.write_block(steps, steps[:, None].astype(np.float32) + base)
        s += k
        if s > 20:
            print("writing", flush=True)
    """
)


def test_a_store_killed_mid_write_on_s3_still_opens(s3):
    bucket, env = s3
    base = np.arange(300, dtype=np.float32) / 300
    url = f"s3://{bucket}/killed.zarr"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, url], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    ds = open_run(url)
    n = ds.sizes["step"]
    assert n > 20 and ds.attrs["status"] == "recording"
    np.testing.assert_array_equal(ds["step"].values, np.arange(n))  # only whole, committed rows
    np.testing.assert_array_equal(ds["values"].values, np.arange(n)[:, None].astype(np.float32) + base)
    # no flock on S3: the killed writer's lock object stays until someone removes it
    with pytest.raises(CorrtoolsError, match="if that process was killed, delete s3://runs/killed.zarr/step/writer.lock"):
        RunWriter.resume(url)
    import fsspec

    fsspec.filesystem("s3").rm_file(f"{bucket}/killed.zarr/step/writer.lock")
    w = RunWriter.resume(url)
    w.write_block([n], (np.float32(n) + base)[None])
    w.close(base, n + 1)
    np.testing.assert_array_equal(open_run(url)["values"].values, np.arange(n + 1)[:, None].astype(np.float32) + base)
