#!/usr/bin/env bash
# Every GPU check of this project in one call, for a session that is lent a CUDA machine for minutes:
# the issue-13 benchmark table, the CUDA test tier, the probe's profile and the bf16 loss kernel. Outputs go to $OUT (or
# ./gpu_session_out); each step's log is kept even when a later step fails.
#
#     OUT=/some/dir bash benchmarks/gpu_session.sh        # about 4-5 minutes on an H100 or H200
#
# The optional peers come from wheels in .whl/ when that folder exists (the GPU machine has no index):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl opacus==1.6.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_session_out}"
mkdir -p "$out"
py="${PYTHON:-$(command -v python || command -v python3)}"
# optional peers (Opacus, Liger-Kernel, Cut Cross-Entropy) carried as wheels in .whl/ (no index on the GPU machine)
if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" > "$out/device.txt" 2>&1; then
    cat "$out/device.txt"
    echo "gpu_session: no CUDA device (or no torch) for $py" >&2
    exit 2
fi
{
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    "$py" -c "import triton; print('triton', triton.__version__)" || echo "triton: not installed"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
} > "$out/device.txt" 2>&1
cat "$out/device.txt"
status=0
step() {  # step NAME SECONDS COMMAND...: run (at most SECONDS), log to $out/NAME.log, remember a failure, go on
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "   rc $rc, $((SECONDS - t0)) s"
    tail -n 3 "$out/$name.log"
    [ $rc -eq 0 ] || status=1
}
step gpu_all 200 "$py" benchmarks/gpu_all.py --out "$out/gpu_all.json"
step cuda_tests 150 "$py" -m pytest -q -p no:cacheprovider -m cuda tests/core/test_cuda.py tests/core/test_compute_async.py tests/gradients
step profile_probe 60 "$py" benchmarks/profile_gradients.py --m 64 --out "$out/profile_probe_m64.txt"
step host_overhead 45 "$py" benchmarks/bench_gradients.py --host-overhead
step bench_loss 60 "$py" benchmarks/bench_loss.py --device cuda --out "$out/bench_loss.json"
exit $status
