"""Bodies of the 2-process gloo groups spawned by test_distributed.py (a module of its own, so that
spawned children import it without importing pytest's test module)."""
from __future__ import annotations

import datetime
import os
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

STEPS = 10
SAMPLE = 6


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    # 7 and 3 rows: Shard(0) splits them unevenly (4 + 3, 2 + 1) over 2 ranks
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(1000 * rank + step))


def _sharded(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def ddp_then_sharded(rank: int, world: int, port: int, tmp: str) -> None:
    """DDP: rank 0 writes, rank 1 pays nothing. FSDP2: both write their parts; rank 0 also records
    the gathered full weights with a plain model (the single-process code path) as the reference."""
    from corrtools import Recorder

    _init(rank, world, port)
    tmp_path = Path(tmp)
    # --- DDP
    ddp = nn.parallel.DistributedDataParallel(_model())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    threads = {t.name for t in threading.enumerate()}
    rec = Recorder(ddp, tmp_path / "ddp.zarr", sample=SAMPLE, chunk_steps=4).attach(opt)
    if rank != 0:
        assert type(rec).__name__ == "_IdleRecorder"
        assert not opt._optimizer_step_post_hooks, "an idle rank must not hook the optimizer"
        assert {t.name for t in threading.enumerate()} == threads, "an idle rank must start no thread"
    expected = []
    for step in range(1, STEPS + 1):
        loss = ddp(_batch(rank, step)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        rec.log(loss=loss.item())
        expected.append({n: p.detach().clone().numpy() for n, p in ddp.module.named_parameters()})
    rec.close()
    if rank == 0:
        np.savez(tmp_path / "ddp_expected.npz", **{f"{s}|{n}": v for s, row in enumerate(expected, 1) for n, v in row.items()})
    dist.barrier()
    # --- FSDP2 fully_shard
    model = _sharded(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_model = _model()  # plain tensors: recorded by rank 0 alone, like a single process
    ref = Recorder(ref_model, tmp_path / "ref.zarr", sample=SAMPLE, chunk_steps=4)
    with Recorder(model, tmp_path / "sharded.zarr", sample=SAMPLE, chunk_steps=4).attach(opt) as rec:
        assert type(rec).__name__ == "Recorder"
        for step in range(1, STEPS + 1):
            loss = model(_batch(rank, step)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.log(loss=loss.item())
            full = {n: p.full_tensor() for n, p in model.named_parameters()}  # a collective
            with torch.no_grad():
                for n, p in ref_model.named_parameters():
                    p.copy_(full[n])
            ref.record(loss=loss.item())
        with torch.no_grad():
            for n, p in ref_model.named_parameters():  # `final` of both is read at close
                p.copy_(dict(model.named_parameters())[n].full_tensor())
    ref.close()
    dist.destroy_process_group()


def dies_midway(rank: int, world: int, port: int, tmp: str) -> None:
    """Rank 1 dies after 5 steps with 4 rows committed; rank 0 notices at its next collective."""
    from corrtools import Recorder

    _init(rank, world, port)
    model = _sharded(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with Recorder(model, Path(tmp) / "dead.zarr", sample=SAMPLE, chunk_steps=2).attach(opt) as rec:
            for step in range(1, STEPS + 1):
                model(_batch(rank, step)).square().mean().backward()
                opt.step()
                opt.zero_grad()
                if rank == 1 and step == 5:
                    rec._wait_writer()  # rows 1..4 are on disk, row 5 only in memory
                    os._exit(3)
    except Exception as err:  # rank 0: the dead peer breaks FSDP's next all-gather
        assert rank == 0, err
        os._exit(0)
    raise AssertionError(f"rank {rank} finished although rank 1 died")
