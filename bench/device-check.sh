#!/usr/bin/env bash
# Device check for a CUDA machine (written for 1 GPU + 16 cores; about 2-4 minutes on an H100):
#
#   1. a synthetic ImageNet-like set ($IMAGES JPEGs, bin/make-dataset; made once, kept in
#      $WORK/data), unless DATA names a folder of images to use instead
#   2. ResNeXt-50 exported to TorchScript with bin/export (random weights, saved first as a state
#      dict: no real weights exist offline, and throughput does not depend on them)
#   3. bin/run-bench, compute only, batch sizes $BATCH_SIZES at $PRECISION, static shapes
#   4. bin/run-eval --workers $WORKERS at the batch size with the best compute-only img/s
#   5. a summary: compute-only and end-to-end img/s and their ratio, with the card and the cores
#
# Results go to $OUT (default /tmp/device-check): bench.json, bench.txt, bench.png (if matplotlib
# is there), eval.json, eval.txt, summary.json; the bulky files (images, weights, TorchScript) to
# $WORK (default /tmp/device-check-work), reused by the next run. Needs no network: torch and
# torchvision must already be importable by $PY (default: .venv/bin/python if present, else python3).
#
# The same logic runs on a machine without a GPU, smaller:
#   BACKEND=cpu PRECISION=fp32 MODEL=resnet18 IMAGES=24 CLASSES=4 BATCH_SIZES=1,2 ITERATIONS=2 \
#   WARMUP=1 WORKERS=2 EXTRA="--resize 64 --crop 56" bench/device-check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-/tmp/device-check}
WORK=${WORK:-/tmp/device-check-work}
BACKEND=${BACKEND:-cuda}
PRECISION=${PRECISION:-fp16}
MODEL=${MODEL:-resnext50_32x4d}
IMAGES=${IMAGES:-5000}
CLASSES=${CLASSES:-100}
BATCH_SIZES=${BATCH_SIZES:-1,2,4,8,16,32,64,128,256}
WARMUP=${WARMUP:-5}
ITERATIONS=${ITERATIONS:-50}
WORKERS=${WORKERS:-16}
EXTRA=${EXTRA:-}            # more flags for run-bench and run-eval, e.g. "--cuda-graphs"
# DATA: an image folder to use instead of generating one under $WORK/data

start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }
die() { echo "device-check: error: $*" >&2; exit 1; }

mkdir -p "$OUT" "$WORK"
weights="$WORK/$MODEL-random.pth"
ts="$WORK/$MODEL.ts"

step "environment ($PY); random $MODEL weights -> $weights"
# one interpreter start for both: a torch import costs seconds
"$PY" - "$BACKEND" "$MODEL" "$weights" <<'EOF' || die "$PY cannot run the engine (torch, torchvision, numpy, Pillow); set PY=/path/to/python"
import os, sys
import numpy, PIL, torch, torchvision
backend, model, weights = sys.argv[1:4]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"cores {len(os.sched_getaffinity(0))}")
if backend == "cuda":
    if not torch.cuda.is_available():
        sys.exit("torch.cuda.is_available() is False: no usable GPU (or a CPU-only torch build)")
    print(f"gpu {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}")
if not os.path.isfile(weights):  # no real weights offline; throughput does not depend on them
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(model, weights=None).state_dict(), weights + ".partial")
    os.replace(weights + ".partial", weights)
EOF

if [ -n "${DATA:-}" ]; then
    step "data: $DATA (given)"
    [ -d "$DATA" ] || die "DATA=$DATA: no such folder"
else
    DATA="$WORK/data"
    step "synthetic set: $IMAGES images, $CLASSES classes -> $DATA"
    stamp="$DATA/.device-check-$IMAGES-$CLASSES"
    if [ -f "$stamp" ]; then
        echo "already there"
    else
        rm -rf "$DATA"  # our own folder under $WORK, from an earlier run with other sizes
        "$PY" bin/make-dataset "$DATA" --images "$IMAGES" --classes "$CLASSES" --workers "$WORKERS"
        touch "$stamp"
    fi
fi

step "export $MODEL -> $ts"
if [ ! -f "$ts" ]; then
    "$PY" bin/export "$weights" "$ts" --model "$MODEL"
else
    echo "already there"
fi

step "run-bench: compute only, $BACKEND $PRECISION static, batch sizes $BATCH_SIZES"
plot=()
if "$PY" -c "import matplotlib" 2>/dev/null; then plot=(--plot "$OUT/bench.png"); fi
# shellcheck disable=SC2086
"$PY" bin/run-bench --backend "$BACKEND" --precision "$PRECISION" --model "$MODEL" --ts "$ts" --shape static \
    --batch-sizes "$BATCH_SIZES" --warmup "$WARMUP" --iterations "$ITERATIONS" --json "$OUT/bench.json" \
    ${plot[@]+"${plot[@]}"} $EXTRA | tee "$OUT/bench.txt"

# the best compute-only batch size whose ring (in-flight batches + 2 slots of uint8 images) fits in /dev/shm
best=$("$PY" - "$OUT/bench.json" <<'EOF'
import json, shutil, sys
bench = json.load(open(sys.argv[1]))
crop = bench["config"]["preprocess"]["crop"]
slots = bench["config"]["pipeline"]["inflight"] + 2
try:
    free = shutil.disk_usage("/dev/shm").free
except OSError:
    free = None
rows = sorted(bench["results"], key=lambda r: -r["img_per_s"])
fits = [r for r in rows if free is None or slots * r["batch_size"] * crop * crop * 3 * 1.2 < free]
if not fits:
    sys.exit("device-check: /dev/shm has %d MB free, too little for any batch size" % (free >> 20))
if fits[0] is not rows[0]:
    print("device-check: batch %d is fastest but its ring does not fit in /dev/shm (%d MB free); using batch %d"
          % (rows[0]["batch_size"], free >> 20, fits[0]["batch_size"]), file=sys.stderr)
print(fits[0]["batch_size"])
EOF
)

step "run-eval: $DATA, $WORKERS workers, batch $best (the best compute-only batch size)"
status=0
# shellcheck disable=SC2086
"$PY" bin/run-eval --data "$DATA" --backend "$BACKEND" --precision "$PRECISION" --model "$MODEL" --ts "$ts" \
    --batch-size "$best" --workers "$WORKERS" --json "$OUT/eval.json" --no-progress $EXTRA \
    | tee "$OUT/eval.txt" || status=$?
[ "$status" -le 1 ] || die "run-eval failed with status $status"

step "summary"
"$PY" - "$OUT" "$best" "$(( $(date +%s) - start ))" <<'EOF'
import json, os, sys
out, best, elapsed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
bench = json.load(open(os.path.join(out, "bench.json")))
ev = json.load(open(os.path.join(out, "eval.json")))
row = next(r for r in bench["results"] if r["batch_size"] == best)
info = ev["backend"]
tp = ev["throughput"]
summary = {
    "device": info.get("device_name") or info.get("device"),
    "backend": info.get("backend"), "precision": info.get("precision"), "model": ev["config"]["model"]["name"],
    "cores": len(os.sched_getaffinity(0)), "workers": ev["config"]["pipeline"]["workers"], "batch_size": best,
    "images": ev["images"], "failed": ev["failed"],
    "compute_only_bench_img_per_s": row["img_per_s"],
    "compute_only_eval_img_per_s": tp["compute_only"],
    "end_to_end_img_per_s": tp["end_to_end"],
    "ratio_end_to_end_over_compute_only": tp["ratio"],
    "ratio_end_to_end_over_bench": tp["end_to_end"] / row["img_per_s"] if row["img_per_s"] else None,
    "decode_img_per_s_per_worker": ev["stages"].get("decode_img_per_s_per_worker"),
    "bench": [{"batch_size": r["batch_size"], "img_per_s": round(r["img_per_s"], 1),
               "p50_ms": round(r["latency_ms"]["p50"], 3)} for r in bench["results"]],
    "elapsed_s": elapsed,
}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(f"device             {summary['device']} ({summary['backend']}, {summary['precision']}, {summary['model']})")
print(f"cores / workers    {summary['cores']} / {summary['workers']}, batch {best}")
print(f"compute only       {row['img_per_s']:,.1f} img/s (run-bench), {tp['compute_only']:,.1f} img/s (run-eval)")
print(f"end to end         {tp['end_to_end']:,.1f} img/s ({ev['images']:,} images, {ev['failed']} failed)")
ratio = tp["ratio"]
print(f"ratio              {ratio:.3f} (end to end / compute only, same run)" if ratio else "ratio              -")
print(f"elapsed            {elapsed} s; JSON in {out}")
EOF
