"""One-shot checks of corrtools.sparse's CUDA-only paths, for a GPU machine (benchmarks/gpu_check.sh runs it).

Each check prints ``OK``, ``FAIL`` (with the error) or ``INFO`` lines and never stops the others;
the last line counts the failures. Sections:

- env: torch, CUDA, cuSPARSELt, the backend class and shape multiples corrtools picks;
- convert: finalized 2:4 / 2:4-2d models in fp16 and bf16 (bias, no bias, a Conv2d, a Linear of
  unsupported shape, a dense head) through ``to_semi_structured_``: which layers convert (against
  ``semi_structured_candidates``), outputs against the dense model for 2D/3D/odd-row/non-contiguous
  inputs, under no_grad and with grad enabled, under fp16 autocast with an fp32 LayerNorm;
- cutlass: the same with torch's CUTLASS backend forced (off compute capability 8.x: the error);
- errors: the error messages (fp32 weights, CPU model, no 2:4 layer) and what a second conversion,
  ``semi_structured_candidates`` on a converted model, state_dict/deepcopy/torch.save and backward do;
- masks: every mask function on the GPU against the CPU (random, tied, NaN/inf; fp32/fp16/bf16);
- train: a Sparsifier trained on the GPU, finalized, converted, compared with its dense copy;
- sweep: dense vs 2:4 times over a few shapes and both backends (CUDA events, medians);
- overhead: eager against CUDA-graph replay, host time per call, cuSPARSELt's alg_id search, a
  profiler table of the 2:4 layer.

    python benchmarks/gpu_check_sparse.py [--sections env,convert,...]

Without CUDA only the masks section runs (CPU against the CPU device path) and the rest is SKIP.
"""
from __future__ import annotations

import argparse
import copy
import io
import traceback

import torch
import torch.nn.functional as F
from torch import nn

import semi_structured  # beside this script: one timing method for both
import corrtools.sparse.masks as masks
from corrtools.errors import CorrtoolsError
from corrtools.sparse import Reset, Sparsifier, is_2to4, kernels, semi_structured_candidates, to_semi_structured_

FAILS: list[str] = []
CUDA = torch.cuda.is_available()
DEV = "cuda"  # a local dry run of the script's logic may set "cpu"


def ok(msg: str) -> None:
    print(f"OK    {msg}", flush=True)


def fail(msg: str) -> None:
    FAILS.append(msg)
    print(f"FAIL  {msg}", flush=True)


def info(msg: str) -> None:
    print(f"INFO  {msg}", flush=True)


def check(name: str, fn) -> None:
    """Run ``fn``; an exception is a FAIL with its last traceback lines."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - report everything, stop nothing
        tb = traceback.format_exc().strip().splitlines()
        fail(f"{name}: {type(e).__name__}: {str(e)[:400]}")
        for line in tb[-6:]:
            print(f"      {line}")


def outcome(name: str, fn) -> None:
    """Run ``fn`` and report what happens either way (INFO): for behaviour without a fixed expectation."""
    try:
        r = fn()
        info(f"{name}: works{'' if r is None else f' -> {r}'}")
    except Exception as e:  # noqa: BLE001
        info(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------- env
def section_env() -> None:
    print("== env", flush=True)
    info(f"torch {torch.__version__}, CUDA runtime {torch.version.cuda}, cuda available {CUDA}")
    if not CUDA:
        return
    info(f"device {torch.cuda.get_device_name()} capability {torch.cuda.get_device_capability()}")
    cs = getattr(torch.backends, "cusparselt", None)
    info(f"cusparselt available {cs is not None and cs.is_available()}, version {cs.version() if cs and cs.is_available() else None}")
    info(f"corrtools backend {kernels._backend().__name__}; multiples fp16 {kernels._shape_multiples(torch.float16)} "
         f"bf16 {kernels._shape_multiples(torch.bfloat16)}")


# ------------------------------------------------------------------------------------------ convert
class ConvThenMLP(nn.Module):
    """Conv2d (2:4 along c), then Linears of several kinds; LayerNorm between two of them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(512, 256)  # bias
        self.norm = nn.LayerNorm(256)
        self.fc2 = nn.Linear(256, 128, bias=False)
        self.odd = nn.Linear(128, 24)  # 24 rows: no backend's multiple -> stays dense
        self.head = nn.Linear(24, 10)  # the output head: left dense by the Sparsifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = F.relu(self.conv(x)).flatten(1)
        h = F.relu(self.norm(self.fc1(x)))
        return self.head(F.relu(self.odd(F.relu(self.fc2(h)))))


def _finalized(structure: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ConvThenMLP()
    sp = Sparsifier(model, None, structure=structure)
    assert "conv.weight" in sp.layer_names and "odd.weight" in sp.layer_names, sp.layer_names
    sp.finalize()
    return model


def _convert_case(structure: str, dtype: torch.dtype) -> None:
    tag = f"{structure} {str(dtype)[6:]}"
    model = _finalized(structure).to(DEV, dtype)
    dense = copy.deepcopy(model)
    expected = semi_structured_candidates(model, dtype)
    to_semi_structured_(model)
    converted = [n for n, m in model.named_modules()
                 if isinstance(getattr(m, "weight", None), torch.sparse.SparseSemiStructuredTensor)]
    if converted == expected == ["fc1", "fc2"]:
        ok(f"{tag}: converted {converted} == semi_structured_candidates")
    else:
        fail(f"{tag}: converted {converted}, candidates {expected}, wanted ['fc1', 'fc2']")
    w = model.fc1.weight
    if isinstance(w, nn.Parameter) and not w.requires_grad and type(w) is kernels._backend():
        ok(f"{tag}: fc1.weight is a frozen Parameter of {type(w).__name__}")
    else:
        fail(f"{tag}: fc1.weight {type(w).__name__}, Parameter {isinstance(w, nn.Parameter)}, requires_grad {w.requires_grad}")
    for name in ("conv", "odd", "head", "norm"):
        mw = model.get_submodule(name).weight
        if mw.layout != torch.strided or type(mw) is not nn.Parameter or not mw.requires_grad:
            fail(f"{tag}: {name} was changed ({type(mw).__name__})")
    ok(f"{tag}: conv, odd (24 rows), head and norm left dense")

    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    inputs = {
        "(64, 512)": torch.randn(64, 512, device=DEV, dtype=dtype),
        "(1, 512)": torch.randn(1, 512, device=DEV, dtype=dtype),
        "(17, 512)": torch.randn(17, 512, device=DEV, dtype=dtype),
        "(4, 7, 512)": torch.randn(4, 7, 512, device=DEV, dtype=dtype),
        "(8, 16, 4, 4) conv": torch.randn(8, 16, 4, 4, device=DEV, dtype=dtype),
    }
    with torch.no_grad():
        for label, x in inputs.items():
            check(f"{tag} forward {label}", lambda x=x, label=label: _compare(tag, label, dense, model, x, tol))
    # grad enabled, input not requiring grad (a plain eval loop without no_grad)
    check(f"{tag} forward with grad enabled", lambda: _compare(tag, "grad enabled", dense, model, inputs["(64, 512)"], tol))
    # a non-contiguous input (a transposed view)
    xt = torch.randn(512, 64, device=DEV, dtype=dtype).t()
    outcome(f"{tag} forward non-contiguous input (64, 512) view",
            lambda: f"rel err {rel_err(dense(xt), model(xt)):.2e}")


def _compare(tag: str, label: str, dense: nn.Module, sparse: nn.Module, x: torch.Tensor, tol: float) -> None:
    yd, ys = dense(x), sparse(x)
    err = rel_err(yd, ys)
    if ys.shape == yd.shape and ys.dtype == yd.dtype and err < tol:
        ok(f"{tag} forward {label}: shape {tuple(ys.shape)}, max rel err {err:.2e}")
    else:
        fail(f"{tag} forward {label}: shapes {tuple(yd.shape)}/{tuple(ys.shape)}, err {err:.2e} (tol {tol})")


def _autocast_case() -> None:
    """Mixed precision: Linear weights fp16 (converted), LayerNorm fp32, fp32 input under autocast."""
    model = _finalized("2:4").to(DEV)
    for name in ("fc1", "fc2", "odd", "head", "conv"):
        model.get_submodule(name).half()
    dense = copy.deepcopy(model)
    to_semi_structured_(model)
    x = torch.randn(32, 512, device=DEV)
    with torch.no_grad(), torch.autocast(DEV, dtype=torch.float16):
        err = rel_err(dense(x), model(x))
    if err < 5e-3:
        ok(f"autocast fp16 with fp32 LayerNorm: max rel err {err:.2e}")
    else:
        fail(f"autocast fp16 with fp32 LayerNorm: err {err:.2e}")


def section_convert() -> None:
    print("== convert", flush=True)
    for structure in ("2:4", "2:4-2d"):
        for dtype in (torch.float16, torch.bfloat16):
            check(f"convert {structure} {dtype}", lambda s=structure, d=dtype: _convert_case(s, d))
    check("autocast", _autocast_case)
    outcome("autocast bf16 over fp16 converted weights", _autocast_bf16_over_fp16)


def _autocast_bf16_over_fp16() -> str:
    model = _finalized("2:4").to(DEV, torch.float16)
    to_semi_structured_(model)
    with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16):
        return str(model(torch.randn(8, 512, device=DEV)).dtype)


def section_cutlass() -> None:
    print("== cutlass (forced)", flush=True)
    base = torch.sparse.SparseSemiStructuredTensor
    base._FORCE_CUTLASS = True
    try:
        info(f"forced: corrtools backend {kernels._backend().__name__}, multiples fp16 {kernels._shape_multiples(torch.float16)}")
        if torch.cuda.get_device_capability()[0] != 8:  # torch's CUTLASS 2:4 kernels are sm8x only
            _expect_error("CUTLASS forced off compute capability 8.x",
                          lambda: to_semi_structured_(_finalized("2:4").to(DEV, torch.float16)), r"CUTLASS .* 8\.x")
            return
        for dtype in (torch.float16, torch.bfloat16):
            check(f"cutlass convert 2:4 {dtype}", lambda d=dtype: _convert_case("2:4", d))
    finally:
        base._FORCE_CUTLASS = False


# ------------------------------------------------------------------------------------------- errors
def _expect_error(name: str, fn, pattern: str) -> None:
    import re

    try:
        fn()
    except CorrtoolsError as e:
        if re.search(pattern, str(e)):
            ok(f"{name}: CorrtoolsError: {e}")
        else:
            fail(f"{name}: CorrtoolsError without {pattern!r}: {e}")
        return
    except Exception as e:  # noqa: BLE001
        fail(f"{name}: {type(e).__name__} instead of CorrtoolsError: {e}")
        return
    fail(f"{name}: no error")


def section_errors() -> None:
    print("== errors and edges", flush=True)
    _expect_error("fp32 2:4 model on CUDA", lambda: to_semi_structured_(_finalized("2:4").to(DEV)), r"fp16 or bf16")
    _expect_error("fp16 model on CPU", lambda: to_semi_structured_(_finalized("2:4").half()), r"CUDA GPU")
    _expect_error("no 2:4 Linear", lambda: to_semi_structured_(ConvThenMLP().to(DEV, torch.float16)), r"No Linear weight is 2:4")

    model = _finalized("2:4").to(DEV, torch.float16)
    to_semi_structured_(model)
    def second():
        before = model.fc1.weight
        to_semi_structured_(model)
        assert model.fc1.weight is before and semi_structured_candidates(model) == [] and is_2to4(before)
        ok("a second to_semi_structured_ does nothing; candidates of a converted model []; is_2to4 True")

    check("second conversion", second)
    outcome("state_dict of a converted model", lambda: sorted((k, type(v).__name__) for k, v in model.state_dict().items())[:3])
    outcome("copy.deepcopy of a converted model", lambda: type(copy.deepcopy(model).fc1.weight).__name__)
    outcome("torch.save of a converted model", lambda: len(_save(model)))
    outcome("model.cuda() / .half() after conversion", lambda: type(model.to(DEV).half().fc1.weight).__name__)

    def backward():
        x = torch.randn(16, 512, device=DEV, dtype=torch.float16, requires_grad=True)
        model(x).sum().backward()
        return f"x.grad {tuple(x.grad.shape)}"

    outcome("backward to the input through converted layers", backward)


def _save(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


# -------------------------------------------------------------------------------------------- masks
def _mask_inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    yield "random (64, 128)", torch.randn(64, 128, generator=g).to(dtype)
    yield "ties (64, 128)", torch.randint(-2, 3, (64, 128), generator=g).to(dtype)
    w = torch.randn(32, 64, generator=g)
    w[0, :8] = float("nan"); w[3, 4:12] = float("inf"); w[5, :4] = -float("inf")
    yield "nan/inf (32, 64)", w.to(dtype)
    yield "conv ties (16, 8, 3, 3)", torch.randint(-1, 2, (16, 8, 3, 3), generator=g).to(dtype)
    yield "large (1024, 1024)", torch.randn(1024, 1024, generator=g).to(dtype)


def section_masks(device: str) -> None:
    print(f"== masks on {device} against the CPU", flush=True)
    fns = {
        "topk_mask 0.3": lambda w: masks.topk_mask(w, 0.3),
        "nm_mask": lambda w: masks.nm_mask(w),
        "nm_mask 1:4": lambda w: masks.nm_mask(w, 1, 4),
        "nm_mask_2d": lambda w: masks.nm_mask_2d(w),
        "block_mask 0.25 b4": lambda w: masks.block_mask(w, 0.25, 4),
        "topk_mask_many 0.2": lambda w: torch.cat([m.reshape(-1) for m in masks.topk_mask_many([w, w[:8] * 2], 0.2)]),
        "nm_mask_2d_many": lambda w: torch.cat([m.reshape(-1) for m in masks.nm_mask_2d_many([w, w[:8] * 2])]),
        "block_mask_many 0.3 b4": lambda w: torch.cat([m.reshape(-1) for m in masks.block_mask_many([w, w[:8] * 2], 0.3, 4)]),
    }
    bad = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for label, w in _mask_inputs(dtype):
            for fname, fn in fns.items():
                try:
                    ref = fn(w)
                    if device == "cpu":
                        old, masks._CPU_SELECT = masks._CPU_SELECT, False  # the accelerators' path on CPU
                        try:
                            got = fn(w.clone())
                        finally:
                            masks._CPU_SELECT = old
                    else:
                        got = fn(w.to(device)).cpu()
                    if not torch.equal(ref, got):
                        bad += 1
                        fail(f"{fname} {label} {str(dtype)[6:]}: {int((ref != got).sum())} of {ref.numel()} differ")
                except Exception as e:  # noqa: BLE001
                    bad += 1
                    fail(f"{fname} {label} {str(dtype)[6:]}: {type(e).__name__}: {str(e)[:300]}")
    if not bad:
        ok(f"all {len(fns)} mask functions x 5 inputs x 3 dtypes equal on {device} and CPU")


# -------------------------------------------------------------------------------------------- train
def section_train() -> None:
    print("== train on the GPU, finalize, convert", flush=True)
    for structure in ("2:4", "2:4-2d"):
        check(f"train {structure}", lambda s=structure: _train_case(s))


def _train_case(structure: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = Sparsifier(model, opt, structure=structure, exploit=Reset(every=5))
    for _ in range(20):
        x = torch.randn(64, 256, device=DEV)
        loss = F.cross_entropy(model(x), torch.randint(0, 10, (64,), device=DEV))
        loss.backward(); opt.step(); sp.step(); opt.zero_grad()
    frac = sp.participating_fraction()
    sp.finalize()
    model.half()
    dense = copy.deepcopy(model)
    to_semi_structured_(model)
    x = torch.randn(128, 256, device=DEV, dtype=torch.float16)
    with torch.inference_mode():
        err = rel_err(dense(x), model(x))
    kinds = [type(m.weight).__name__ for m in model if isinstance(m, nn.Linear)]
    if abs(frac - 0.5) < 1e-6 and err < 5e-3 and kinds[-1] == "Parameter":
        ok(f"train {structure}: participating {frac}, converted {kinds}, max rel err {err:.2e}")
    else:
        fail(f"train {structure}: participating {frac}, kinds {kinds}, err {err:.2e}")


# -------------------------------------------------------------------------------------------- sweep
def _median_ms(fn, x: torch.Tensor, iters: int = 50, warmup: int = 10) -> float:
    """Median ms of ``fn(x)`` (CUDA events), timed as benchmarks/semi_structured.py times it."""
    return semi_structured._median_ms(fn, x, iters, warmup)


# (out features, in features, tokens)
SWEEP_SHAPES = [(4096, 4096, 4096), (4096, 4096, 16384), (8192, 8192, 8192), (4096, 16384, 8192), (16384, 4096, 8192)]


def section_sweep() -> None:
    print("== sweep: dense vs 2:4 (median ms of layer(x), CUDA events)", flush=True)
    base = torch.sparse.SparseSemiStructuredTensor
    for force_cutlass in (False, True) if torch.cuda.get_device_capability()[0] == 8 else (False,):
        base._FORCE_CUTLASS = force_cutlass
        backend = kernels._backend().BACKEND
        for dtype in (torch.float16, torch.bfloat16):
            for out_f, in_f, tokens in SWEEP_SHAPES:
                def run(out_f=out_f, in_f=in_f, tokens=tokens, dtype=dtype, backend=backend):
                    torch.manual_seed(0)
                    model = nn.Sequential(nn.Linear(in_f, out_f, bias=False, device=DEV, dtype=dtype))
                    Sparsifier(model, None, structure="2:4", include=["0"]).finalize()
                    dense = copy.deepcopy(model)
                    to_semi_structured_(model)
                    x = torch.randn(tokens, in_f, device=DEV, dtype=dtype)
                    with torch.inference_mode():
                        td, ts = _median_ms(dense, x), _median_ms(model, x)
                    flops = 2 * tokens * in_f * out_f
                    info(f"{backend:10s} {str(dtype)[6:]:8s} W ({out_f}, {in_f}) x ({tokens}, {in_f}): dense {td:7.3f} ms "
                         f"({flops / td / 1e9:5.0f} TFLOP/s)  2:4 {ts:7.3f} ms  speed-up {td / ts:4.2f}x")
                    del model, dense, x
                    torch.cuda.empty_cache()
                check(f"sweep {backend} {dtype} {out_f}x{in_f}x{tokens}", run)
    base._FORCE_CUTLASS = False


# ----------------------------------------------------------------------------------------- overhead
def _graph_ms(fn, x: torch.Tensor) -> float:
    """Median ms of replaying a CUDA graph of ``fn(x)``: the GPU time without the host's."""
    return semi_structured._graph_median_ms(fn, x, 50, 10)


def _host_us(fn, x: torch.Tensor, n: int = 50) -> float:
    """Mean host microseconds per call of ``fn(x)`` (launches only, one sync at the end)."""
    import time

    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn(x)
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return host / n * 1e6


def section_overhead() -> None:
    """Where the 2:4 layer's time goes: eager vs CUDA graph, host time per call, cuSPARSELt's alg_id."""
    print("== overhead: eager vs CUDA graph, host time, alg_id search, profiler", flush=True)
    for dtype in (torch.float16, torch.bfloat16):
        for side, tokens in ((4096, 4096), (8192, 8192)):
            check(f"overhead {dtype} {side}", lambda d=dtype, side=side, tokens=tokens: _overhead_case(d, side, tokens))
    check("profile", _profile_case)


def _overhead_case(dtype: torch.dtype, side: int, tokens: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(side, side, bias=False, device=DEV, dtype=dtype))
    Sparsifier(model, None, structure="2:4", include=["0"]).finalize()
    dense = copy.deepcopy(model)
    w = model[0].weight.detach().contiguous()
    to_semi_structured_(model)
    x = torch.randn(tokens, side, device=DEV, dtype=dtype)
    tag = f"{str(dtype)[6:]:8s} {side}x{side} x ({tokens}, {side})"
    with torch.inference_mode():
        rows = {"dense": dense, "2:4": model}
        best = None
        try:
            sp = model[0].weight
            search = getattr(torch._C, "_cusparselt", None)
            best = int(torch._cslt_sparse_mm_search(sp.packed, x.t()))
        except Exception as e:  # noqa: BLE001
            info(f"{tag}: alg_id search failed: {type(e).__name__}: {str(e)[:200]} (torch._C._cusparselt {search is not None})")
        if best is not None:
            tuned = nn.Sequential(nn.Linear(side, side, bias=False, device=DEV, dtype=dtype))
            t = torch.sparse.SparseSemiStructuredTensorCUSPARSELT.from_dense(w)
            t.alg_id_cusparselt = best  # from_dense takes no alg_id in torch 2.11
            tuned[0].weight = nn.Parameter(t, requires_grad=False)
            rows[f"2:4 alg_id={best}"] = tuned
        direct = model[0].weight.packed
        rows["_cslt_sparse_mm direct"] = lambda x: torch._cslt_sparse_mm(direct, x.t()).t()
        for name, fn in rows.items():
            eager = _median_ms(fn, x)
            try:
                graph = f"{_graph_ms(fn, x):7.3f}"
            except Exception as e:  # noqa: BLE001
                graph = f"n/a ({type(e).__name__}: {str(e)[:120]})"
            info(f"{tag} {name:24s} eager {eager:7.3f} ms  graph {graph} ms  host {_host_us(fn, x):7.1f} us/call")


def _profile_case() -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 4096, bias=False, device=DEV, dtype=torch.float16))
    Sparsifier(model, None, structure="2:4", include=["0"]).finalize()
    to_semi_structured_(model)
    x = torch.randn(4096, 4096, device=DEV, dtype=torch.float16)
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                model(x)
            torch.cuda.synchronize()
    table = prof.key_averages()
    try:
        print(table.table(sort_by="device_time_total", row_limit=8, max_name_column_width=60))
    except Exception:  # noqa: BLE001 - older torch names it cuda_time_total
        print(table.table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
    print(table.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


SECTIONS = ("env", "convert", "cutlass", "errors", "masks", "train", "sweep", "overhead")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    run = set(args.sections.split(","))
    if "env" in run:
        section_env()
    if CUDA:
        for name in SECTIONS[1:]:
            if name in run:
                {"masks": lambda: section_masks(DEV)}.get(name, globals()[f"section_{name}"])()
    else:
        print("SKIP  convert, cutlass, errors, train, sweep: no CUDA device")
        section_masks("cpu")
    print(f"== {len(FAILS)} failure(s)" + "".join(f"\n   - {f}" for f in FAILS), flush=True)
    return 1 if FAILS else 0


if __name__ == "__main__":
    raise SystemExit(main())
