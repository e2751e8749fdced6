#!/usr/bin/env bash
# `--decode device` check on a CUDA machine (written for 1 H200 + 16 cores; about 6-8 minutes):
#
#   1. environment (torch, torchvision, CUDA, GPU) and the region decoder for fast mode
#   2. a synthetic ImageNet-like set ($IMAGES JPEGs, ImageNet's size distribution, with its share of
#      grayscale, CMYK and progressive files), unless DATA names a folder of images
#   3. the tests: tests/test_device_decode.py and tests/test_cuda_backend.py, the GPU ones included
#   4. bench/bench_gpu_decode.py: GPU decode rate alone (decode + resize + crop, no model) per batch
#      size, beside the host pool's rate (exact, fast; $WORKERS workers) on the same $RATE_FILES files
#   5. bench/device_decode_agreement.py --device cuda: top-1 agreement of the nvJPEG path against
#      exact mode ($AGREE images; the pretrained EfficientNet-Lite0 where its wheel is installed),
#      with the pil resize (the default) and the tensor resize
#   6. run-eval $MODEL $PRECISION batch $BATCH, $WORKERS workers, on all $IMAGES images, with
#      --decode exact, fast and device: end to end and compute-only from the same run; then
#      run-bench --e2e with --decode device on $E2E_LIMIT images (the run-bench path)
#   7. summary.json: end to end / compute-only per decode mode, the device decoder's rate and share
#
# Results go to $OUT (default /tmp/device-decode): at most 8 files (the device tool's limit):
# log.txt (everything), tests.txt, gpu_decode.txt, agreement.json, eval-{exact,fast,device}.json,
# summary.json. Bulky files (images) go to $WORK. Needs no network: torch and torchvision must be
# importable by $PY (default .venv/bin/python if present, else python3); random weights (throughput
# does not depend on them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-/tmp/device-decode}
WORK=${WORK:-/tmp/device-decode-work}
MODEL=${MODEL:-resnext50_32x4d}
PRECISION=${PRECISION:-fp16}
IMAGES=${IMAGES:-10000}
CLASSES=${CLASSES:-100}
BATCH=${BATCH:-256}
WORKERS=${WORKERS:-16}
RATE_FILES=${RATE_FILES:-2000}
AGREE=${AGREE:-1000}
E2E_LIMIT=${E2E_LIMIT:-2560}
EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1 IMAGENET_ENGINE_NO_DOWNLOAD=1 PYTHONWARNINGS=ignore::DeprecationWarning

mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/log.txt") 2>&1
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

step "environment ($PY)"
"$PY" - <<'EOF'
import os, sys, PIL, numpy, torch, torchvision
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision "
      f"{torchvision.__version__}, Pillow {PIL.__version__}, cores {len(os.sched_getaffinity(0))}")
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: this script needs a GPU")
print(f"gpu {torch.cuda.get_device_name(0)}")
EOF

step "region decoder (fast mode)"
"$PY" -m preprocess.native --check || "$PY" -m preprocess.native --build --check \
    || echo "no region decoder: fast mode decodes whole images"

if [ -n "${DATA:-}" ]; then
    step "data: $DATA (given)"
else
    DATA=$WORK/data-$IMAGES
    if [ ! -f "$DATA/.complete" ]; then
        step "data: $IMAGES synthetic JPEGs into $DATA"
        "$PY" bin/make-dataset "$DATA" --images "$IMAGES" --classes "$CLASSES" --workers "$(nproc)" >/dev/null
        touch "$DATA/.complete"
    fi
fi

step "tests (device decode, cuda backend)"
"$PY" -m pytest -q -ra -p no:cacheprovider tests/test_device_decode.py tests/test_cuda_backend.py 2>&1 \
    | tee "$OUT/tests.txt" || echo "TESTS FAILED (continuing with the measurements)"

step "GPU decode rate alone per batch size, host pool beside it ($RATE_FILES files)"
"$PY" bench/bench_gpu_decode.py --data "$DATA" --limit "$RATE_FILES" --device cuda --batch-sizes 32,64,128,256 \
    --seconds 3 --workers "$WORKERS" 2>&1 | tee "$OUT/gpu_decode.txt" || echo "bench_gpu_decode FAILED"

for method in pil tensor; do
    step "top-1 agreement, nvJPEG path ($method resize) vs exact ($AGREE images)"
    "$PY" bench/device_decode_agreement.py --data "$DATA" --images "$AGREE" --device cuda --batch 128 \
        --resize-method "$method" --json "$WORK/agreement-$method.json" || echo "agreement below the gate, or FAILED"
done
"$PY" -c 'import json, sys; json.dump({m: json.load(open(f"{sys.argv[1]}/agreement-{m}.json")) for m in ("pil", "tensor")},
    open(sys.argv[2], "w"), indent=1)' "$WORK" "$OUT/agreement.json" || true

for mode in exact fast device; do
    step "run-eval $MODEL $PRECISION batch $BATCH, $WORKERS workers, --decode $mode, $IMAGES images"
    "$PY" bin/run-eval --data "$DATA" --backend cuda --model "$MODEL" --precision "$PRECISION" \
        --batch-size "$BATCH" --workers "$WORKERS" --decode "$mode" --no-progress \
        --json "$OUT/eval-$mode.json" $EXTRA || echo "run-eval --decode $mode exited with $?"
done

step "run-bench --e2e --decode device, batch $BATCH, $E2E_LIMIT images"
"$PY" bin/run-bench --backend cuda --model "$MODEL" --precision "$PRECISION" --batch-sizes "$BATCH" --iterations 20 \
    --e2e "$DATA" --limit "$E2E_LIMIT" --workers "$WORKERS" --decode device $EXTRA \
    || echo "run-bench --e2e --decode device exited with $?"

step "summary"
"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
summary = {}
for mode in ("exact", "fast", "device"):
    path = os.path.join(out, f"eval-{mode}.json")
    if not os.path.exists(path):
        summary[mode] = None
        continue
    r = json.load(open(path))
    t = r.get("throughput", {})
    e2e, comp = t.get("end_to_end"), t.get("compute_only")
    summary[mode] = {"end_to_end_img_per_s": e2e, "compute_only_img_per_s": comp,
                     "ratio": (e2e / comp) if e2e and comp else None, "images": r.get("images"),
                     "failed": r.get("failed"), "top1": r.get("top1"), "device_decode": r.get("device_decode"),
                     "verdict": r.get("profile", {}).get("verdict")}
    ratio = summary[mode]["ratio"]
    print(f"{mode:7s} end to end {e2e or 0:9,.0f} img/s  compute-only {comp or 0:9,.0f} img/s  "
          f"ratio {ratio if ratio is not None else float('nan'):.3f}")
try:
    summary["agreement"] = json.load(open(os.path.join(out, "agreement.json")))
except OSError:
    summary["agreement"] = None
summary["target"] = "device: end to end >= 0.8 of compute-only; agreement >= 99.5 %"
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
EOF
step "done"
