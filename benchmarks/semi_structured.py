"""Dense vs 2:4 semi-structured fp16 linear layers on a CUDA GPU with Sparse Tensor Cores.

A 4096x4096 fp16 ``nn.Linear`` (no bias) is made 2:4 by ``Sparsifier(structure="2:4")`` +
``finalize()``, then converted by ``to_semi_structured_``; the same layer dense is the baseline.
Prints median times (CUDA events) of ``layer(x)`` for x of shape (tokens, 4096), the speed-up
(goal >= 1.3x on an H100-class GPU), and the largest relative output difference; then the same
times with each call replayed from a CUDA graph, which leaves out the host's cost per call (for the
2:4 layer torch's ``_cslt_sparse_mm`` spent about 0.4-0.9 ms of host time per call on an H200 with
torch 2.11, more than the kernel). Without a CUDA device it prints "no CUDA device" and exits 0.

    python benchmarks/semi_structured.py [--quick]
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch import nn

from corrtools.sparse import Sparsifier, to_semi_structured_


def _median_ms(fn, x: torch.Tensor, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _graph_median_ms(fn, x: torch.Tensor, iters: int, warmup: int) -> float:
    """Median ms of replaying a CUDA graph that holds one ``fn(x)``: GPU time without the host's."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return _median_ms(lambda _: graph.replay(), x, iters, warmup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 1024x1024 layer and few iterations")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if major < 8:
        print(f"no Sparse Tensor Cores on {name} (compute capability {major}.{minor} < 8.0)")
        return 0
    side, tokens, iters, warmup = (1024, 1024, 20, 5) if args.quick else (4096, 4096, 100, 20)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(side, side, bias=False))
    Sparsifier(model, None, structure="2:4", include=["0"]).finalize()
    dense = copy.deepcopy(model).to("cuda", dtype)
    sparse = model.to("cuda", dtype)
    to_semi_structured_(sparse)
    x = torch.randn(tokens, side, device="cuda", dtype=dtype)
    with torch.inference_mode():
        t_dense = _median_ms(dense, x, iters, warmup)
        t_sparse = _median_ms(sparse, x, iters, warmup)
        y_dense, y_sparse = dense(x).float(), sparse(x).float()
    err = float((y_dense - y_sparse).abs().max() / y_dense.abs().max())
    print(f"device: {name} (sm{major}{minor}); layer {side}x{side} {args.dtype}, x ({tokens}, {side})")
    print(f"dense  {t_dense:8.3f} ms")
    print(f"2:4    {t_sparse:8.3f} ms")
    print(f"speed-up {t_dense / t_sparse:5.2f}x (goal >= 1.3x); max relative difference {err:.2e}")
    try:
        with torch.inference_mode():
            g_dense = _graph_median_ms(dense, x, iters, warmup)
            g_sparse = _graph_median_ms(sparse, x, iters, warmup)
    except Exception as e:  # noqa: BLE001 - the eager figures above stand without it
        print(f"CUDA graph replay not measured: {type(e).__name__}: {e}")
        return 0
    print(f"dense  {g_dense:8.3f} ms (CUDA graph replay)")
    print(f"2:4    {g_sparse:8.3f} ms (CUDA graph replay)")
    print(f"speed-up in CUDA graphs {g_dense / g_sparse:5.2f}x (GPU time, no host cost per call)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
