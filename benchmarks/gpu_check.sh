#!/usr/bin/env bash
# The one script the GPU machine runs (issue #5's GPU figures), from the repo root:
#
#     bash benchmarks/gpu_check.sh          # with .whl/ carried along (benchmarks/gpu_wheels.py fills it)
#
# Everything kept goes under $OUT (default /tmp/gpu-out): gpu_check.log (all of it), smoke.log,
# bench.log, bench.md, bench.json. Each step runs under `timeout`, its log tee'd as it goes, so a
# hung step costs at most its own budget and partial logs come back. The whole script ends
# within GPU_CHECK_TOTAL seconds (default 420, 7 min): install + import check ~0.5 min, smoke
# ~0.7 min, the segmentation and detection examples ~1 min, the demo compiled and eager ~1.5 min (the
# limit rows of the benchmark time torch.compile too), 1 vs 2 GPUs ~1 min, and the benchmark gets the rest — its --deadline is set so that it starts no new run
# 60 s before the end (a run in flight may take up to --child-timeout 45 s, then the report).
#
# Environment (for trying the script elsewhere):
#   GPU_CHECK_SKIP_INSTALL=1   do not install .whl/ (the packages are already importable)
#   GPU_CHECK_DEVICE=cpu       run the smoke check and the benchmark on the CPU
#   GPU_CHECK_BENCH_ARGS="..." replace the benchmark's size arguments (default below; they come
#                              after the computed --deadline, so a --deadline there wins)
#   GPU_CHECK_TOTAL=N          the script's wall-time budget in seconds (default 420)
#   GPU_CHECK_SMOKE_TIMEOUT=N  the smoke step's budget in seconds (default 120)
set -u
set -o pipefail
export NO_ALBUMENTATIONS_UPDATE=1  # albumentations would ask PyPI for updates on every import; the device machine is offline

OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TOTAL=${GPU_CHECK_TOTAL:-420}
SMOKE_TIMEOUT=${GPU_CHECK_SMOKE_TIMEOUT:-120}
# 512 images, views 8 and 10 first (the goals), 3 repeats of which the --deadline keeps what
# fits (7 runs per view and repeat: limit, kaggle-tta, ttach in fp32 and auto, the reference);
# --keep-going: a failed run is reported, the others go on; --child-timeout: a hung run is
# killed after 45 s.
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---images 512 --repeats 3 --views 8,10,2 --only limit,kaggle,ttach,reference --child-timeout 45 --keep-going}

step() {  # step NAME SECONDS CMD... : runs CMD under timeout, output tee'd to $OUT/NAME.log when NAME is not "-"
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS rc
    echo
    local cmd="$*"
    echo "=== [$(date +%H:%M:%S), +$((SECONDS))s] $name (timeout ${secs}s): ${cmd:0:160}"
    if [ "$name" = "-" ]; then
        timeout -k 10 "$secs" "$@" 2>&1
    else
        timeout -k 10 "$secs" "$@" 2>&1 | tee "$OUT/$name.log"
    fi
    rc=$?
    echo "=== $name: exit $rc in $((SECONDS - t0))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
    return $rc
}

install_wheels() {
    ls -la .whl/ && du -sh .whl
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
        echo "installed with pip into /tmp/site"
    else  # no pip, or it refused a wheel: a wheel is a zip, unpacked into the target it is installed
        echo "pip failed; unpacking the wheels with zipfile instead"
        python3 - <<'EOF'
import glob, zipfile
for w in sorted(glob.glob(".whl/*.whl")):
    zipfile.ZipFile(w).extractall("/tmp/site")
    print("unpacked", w)
EOF
    fi
}

main() {
    echo "gpu_check: $(date -Is), repo $PWD, OUT=$OUT, device $DEVICE"
    nvidia-smi -L || echo "(no nvidia-smi)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    echo "CPU cores: $(nproc); $(grep -m1 'model name' /proc/cpuinfo); load $(cut -d' ' -f1-3 /proc/loadavg)"
    python3 --version

    if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = "1" ]; then
        echo "GPU_CHECK_SKIP_INSTALL=1: not installing .whl/"
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    else
        export -f install_wheels  # so that `timeout` can run it, through bash
        step - 90 bash -c install_wheels || echo "install step failed; going on (imports will tell)"
        export PYTHONPATH=/tmp/site:$PWD
    fi
    echo "PYTHONPATH=$PYTHONPATH"

    step - 60 python3 -c "
import sys, time
t = time.perf_counter()
import torch, torchvision, timm, numpy, cv2
print('python', sys.version.split()[0], '| torch', torch.__version__, '(CUDA', torch.version.cuda, ') | torchvision', torchvision.__version__,
      '| timm', timm.__version__, '| numpy', numpy.__version__, '| cv2', cv2.__version__)
print('cuda available:', torch.cuda.is_available(), '| devices:', torch.cuda.device_count(),
      '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', '| bf16:', torch.cuda.is_available() and torch.cuda.is_bf16_supported())
import albumentations, albumentations.pytorch, pydantic, polars, ttach, scipy.special
import kaggle_tta.api, kaggle_tta.engine.stream, kaggle_tta.cli
print('albumentations', albumentations.__version__, '| pydantic', pydantic.__version__, '| polars', polars.__version__, '| scipy', scipy.__version__)
print('imports: %.1fs' % (time.perf_counter() - t))
try:
    import ensemble_boxes
    print('ensemble_boxes ok')
except Exception as exc:
    print('ensemble_boxes import failed (detection only; not needed here):', repr(exc))
" || echo "IMPORT CHECK FAILED: the steps below will likely fail too"

    # What a Kaggle T4 x 2 must show: auto resolves per compute capability (fp16 below 8.0,
    # bf16 from 8.0, whatever torch's emulating is_bf16_supported() says), and how many GPUs a
    # run sees (one is used until sharding over ranks lands).
    step - 30 python3 -c "
import torch
from kaggle_tta.engine.device import resolve_precision
for i in range(torch.cuda.device_count()):
    d = torch.device('cuda', i)
    print('gpu', i, torch.cuda.get_device_name(i), 'sm_%d%d' % torch.cuda.get_device_capability(i),
          '| is_bf16_supported():', torch.cuda.is_bf16_supported(), '| auto ->', resolve_precision('auto', d))
print('devices visible:', torch.cuda.device_count(), '(a run uses cuda:0)')
" || echo "precision check failed"

    step smoke "$SMOKE_TIMEOUT" python3 benchmarks/gpu_smoke.py --device "$DEVICE"

    # Segmentation and detection (issue #3) on the device: each example in auto (bf16 on CUDA)
    # and in fp32, separate caches; the tables show whether reduced precision moves the scores.
    tasks() {
        python3 -m kaggle_tta demo-data build/demo/test >/dev/null
        for ex in segmentation detection; do
            for prec in auto fp32; do
                echo "--- $ex, precision $prec"
                python3 -m kaggle_tta run "examples/$ex.yaml" -q --set runtime.device="$DEVICE" --set runtime.precision=$prec \
                    --set cache.dir=/tmp/gc-tasks/$prec --set submission.path=/tmp/gc-tasks/$ex-$prec.csv || echo "$ex $prec FAILED"
            done
            cmp -s /tmp/gc-tasks/$ex-auto.csv /tmp/gc-tasks/$ex-fp32.csv && echo "$ex: auto and fp32 submissions identical" || echo "$ex: auto and fp32 submissions differ"
        done
    }
    export -f tasks
    export DEVICE
    step tasks 100 bash -c tasks

    # Compiled members (issue #27): the demo with runtime.compile true against eager, on the
    # device: each member's line says whether it compiled, in how long, how fast against eager
    # and how far from eager fp32; the two submissions are compared.
    compiled() {
        python3 -m kaggle_tta demo-data build/demo/test >/dev/null
        for c in false true; do
            echo "--- runtime.compile $c"
            python3 -m kaggle_tta run pipeline.yaml -q --set runtime.device="$DEVICE" --set runtime.compile=$c \
                --set cache.dir=/tmp/gc-compile/$c --set submission.path=/tmp/gc-compile/$c.csv || echo "compile $c FAILED"
        done
        cmp -s /tmp/gc-compile/false.csv /tmp/gc-compile/true.csv && echo "compiled and eager submissions identical" || echo "compiled and eager submissions differ"
    }
    export -f compiled
    step compiled 150 bash -c compiled

    # 1 against 2 GPUs (issue #14): the same inference as one process and as torchrun
    # --nproc_per_node 2, one rank per GPU; skipped (and said) where there is one GPU.
    step ranks 150 python3 benchmarks/run.py --device "$DEVICE" --out /tmp/kaggle-tta-ranks --only ranks --images 512 --repeats 1 --ranks-views 8
    cp /tmp/kaggle-tta-ranks/bench.md "$OUT/ranks.md" 2>/dev/null || echo "no ranks.md written"

    rm -rf /tmp/kaggle-tta-bench  # no stale bench.md from an earlier run
    local remain=$((TOTAL - SECONDS))
    local deadline=$((remain - 60)) bench_timeout=$((remain - 5))
    [ "$deadline" -lt 30 ] && deadline=30
    [ "$bench_timeout" -lt 90 ] && bench_timeout=90
    echo "benchmark: ${remain}s of the ${TOTAL}s budget left: --deadline ${deadline}, step timeout ${bench_timeout}s"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    step bench "$bench_timeout" python3 benchmarks/run.py --device "$DEVICE" --out /tmp/kaggle-tta-bench --deadline "$deadline" $BENCH_ARGS
    cp /tmp/kaggle-tta-bench/bench.md /tmp/kaggle-tta-bench/bench.json "$OUT/" 2>/dev/null || echo "no bench.md/bench.json written"
    echo
    echo "gpu_check: done in ${SECONDS}s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

main 2>&1 | tee "$OUT/gpu_check.log"
