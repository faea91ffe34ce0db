#!/usr/bin/env bash
# The GPU checks of corrtools.sparse in one go, for a CUDA machine without network (the device tool).
#
# Needs, in the repo root, the wheels of what the machine's python3 lacks, in the ignored folder .whl
# (pinned as in constraints.txt; python 3.12, manylinux x86-64):
#   zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 donfig==0.8.1.post1 xarray==2026.9.0
# fetched with (once, here):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 donfig==0.8.1.post1 xarray==2026.9.0
# Run (device tool: carry [".whl"], timeout_s about 420):
#   bash benchmarks/gpu_check.sh
# Logs go to $OUT (or /tmp/gpu_check_out): env.txt, pytest.txt, bench.txt, checks.txt.
# CHECK_SECTIONS=env,convert,... limits benchmarks/gpu_check_sparse.py to those sections.
# GPU_CHECK_TESTS="tests/record/test_recorder_cuda.py ..." replaces the pytest selection;
# GPU_CHECK_ONLY=tests stops after pytest (no benchmarks).
# Without .whl the tests that need zarr (tests/sparse/test_autoz.py, tests/record) are left out.
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=/tmp/corrtools_site
NEED_ZARR=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "wheel install failed"; NEED_ZARR=0; }
else
    echo "no .whl folder: skipping the tests that need zarr"
    NEED_ZARR=0
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Tests that start python with their own PYTHONPATH (tests/record's SIGKILL test) find the wheels
# through a .pth file in the interpreter's site-packages (first on sys.path, as PYTHONPATH would be).
if [ "$NEED_ZARR" = 1 ] && ! env -u PYTHONPATH python3 -c "import zarr" 2>/dev/null; then
    PURELIB=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "import sys; sys.path.insert(0, '$SITE')" > "$PURELIB/zz_corrtools_gpu_check.pth" \
        || echo "could not write $PURELIB/zz_corrtools_gpu_check.pth: the SIGKILL recorder test will miss zarr"
fi

{
    date -u
    nvidia-smi || echo "nvidia-smi failed"
    python3 - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count, "mem GiB", round(p.total_memory / 2**30, 1))
    cs = torch.backends.cusparselt
    print("cusparselt", cs.is_available(), cs.version() if cs.is_available() else None)
import importlib
for name in ("numpy", "scipy", "xarray", "pandas", "zarr", "numcodecs", "google_crc32c", "donfig", "packaging", "typing_extensions", "hypothesis", "pytest"):
    try:
        m = importlib.import_module(name)
        print(f"{name:18s} {getattr(m, '__version__', '?'):12s} {getattr(m, '__file__', '')}")
    except Exception as e:
        print(f"{name:18s} MISSING ({type(e).__name__}: {e})")
import corrtools, corrtools.sparse
print("corrtools", corrtools.__version__, corrtools.__file__)
EOF
} 2>&1 | tee "$OUT/env.txt"

echo "== pytest" | tee "$OUT/pytest.txt"
if [ "$NEED_ZARR" = 1 ]; then
    TESTS=(tests/sparse tests/record/test_recorder.py tests/record/test_recorder_cuda.py)
else
    TESTS=(tests/sparse --ignore=tests/sparse/test_autoz.py)
fi
if [ -n "${GPU_CHECK_TESTS:-}" ]; then read -r -a TESTS <<< "$GPU_CHECK_TESTS"; fi
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs --durations=10 "${TESTS[@]}" 2>&1 | tee -a "$OUT/pytest.txt"
echo "pytest exit ${PIPESTATUS[0]}" | tee -a "$OUT/pytest.txt"
[ "${GPU_CHECK_ONLY:-}" = tests ] && exit 0

echo "== benchmarks/semi_structured.py" | tee "$OUT/bench.txt"
for args in "" "--dtype bfloat16"; do
    echo "-- python3 benchmarks/semi_structured.py $args" | tee -a "$OUT/bench.txt"
    timeout 60 python3 benchmarks/semi_structured.py $args 2>&1 | tee -a "$OUT/bench.txt"
done

echo "== benchmarks/gpu_check_sparse.py" | tee "$OUT/checks.txt"
timeout 180 python3 benchmarks/gpu_check_sparse.py ${CHECK_SECTIONS:+--sections "$CHECK_SECTIONS"} 2>&1 | tee -a "$OUT/checks.txt"
echo "gpu_check_sparse exit ${PIPESTATUS[0]}" | tee -a "$OUT/checks.txt"
