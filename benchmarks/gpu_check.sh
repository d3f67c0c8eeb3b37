#!/usr/bin/env bash
# The GPU checks in one prepared script (issue 8): run it on a machine with a CUDA GPU,
#     bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the CUDA path of the tests (tests/test_cuda.py; skipped on machines without CUDA),
# 2. single-GPU AMP throughput of efficientnet_b0 at 224 and efficientnet_b5 at 456, each as
#    trainer img/s next to a bare forward/backward/step loop in the same run (benchmarks/bench_train.py),
#    then the two lab profiles (params/gpu-lab-*.yaml) at their own model, size and batch, with peak
#    GPU memory,
# 3. DDP (NCCL) scaling against one process when two or more GPUs are visible,
# 4. when data/prepared holds the prepared phantom, the default 5-fold train + evaluate on the GPU,
#    written to a temporary folder (models/, reports/ and mlruns/ of the checkout are not touched),
# 5. `dvc repro --force` of the whole pipeline in a copy of the checkout (SKIP_REPRO=1 skips it;
#    SKIP_COMPILE=1 skips step 2's two torch.compile runs: each compiles for a minute or so),
# then OUT/gpu.json (and benchmarks/results/gpu.json): trainer_over_bare per profile, default_train_seconds,
# dvc_repro_seconds, device and versions.
# Steps 1-3 use synthetic stores (random uint8 images), so they need no dataset; nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: step 5 runs in another folder
seconds_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f\n", b - a }'; }
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
status=0
run() {  # name, command...: output to the terminal and $OUT/name.log; failures are counted, not fatal
  local name=$1; shift
  echo "== $name: $*" | tee "$OUT/$name.log"
  # tqdm redraws with carriage returns: split them into lines first, or a progress bar and the
  # epoch line printed after it are one "line" and the filter drops both.
  "$@" 2>&1 | tr '\r' '\n' | tee -a "$OUT/$name.log" | grep -v "it/s\]\|img/s\]\|^ *$"
  local rc=${PIPESTATUS[0]}  # the command's own status, read before anything else resets it
  [ "$rc" -eq 0 ] || { echo "!! $name failed (exit $rc)" | tee -a "$OUT/$name.log"; status=1; }
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())" | tee -a "$OUT/gpu.txt"

run tests_cuda $PY -m pytest -q -rs tests/test_cuda.py
COMMON=(--synthetic --rounds 3 --batches 20 --set train.device=cuda --set train.amp=auto
        --set train.channels_last=true --set train.num_workers=4)
run bench_b0_224 $PY benchmarks/bench_train.py "${COMMON[@]}" --set train.model=efficientnet_b0 \
    --set train.image_size=224 --set prepare.crop.size=224 --set train.batch_size=64 \
    --json "$OUT/bench_b0_224.json" --profile "b0 224 batch 64"
# torch.compile on the same profile (mode default; reduce-overhead adds CUDA graphs): kept only if it pays
for mode in $([ "${SKIP_COMPILE:-0}" = 1 ] || echo default reduce-overhead); do
  run bench_b0_224_compile_$mode $PY benchmarks/bench_train.py "${COMMON[@]}" --set train.model=efficientnet_b0 \
      --set train.image_size=224 --set prepare.crop.size=224 --set train.batch_size=64 --set train.compile=$mode \
      --json "$OUT/bench_b0_224_compile_$mode.json" --profile "b0 224 batch 64, compile $mode"
done
run bench_b5_456 $PY benchmarks/bench_train.py "${COMMON[@]}" --set train.model=efficientnet_b5 \
    --set train.image_size=456 --set prepare.crop.size=456 --set train.batch_size=16 \
    --json "$OUT/bench_b5_456.json" --profile "b5 456 batch 16"
for profile in crop full; do
  run bench_lab_$profile $PY benchmarks/bench_train.py --synthetic --rounds 3 --batches 20 \
      --params params/gpu-lab-$profile.yaml --set train.device=cuda \
      --json "$OUT/bench_lab_$profile.json" --profile "params/gpu-lab-$profile.yaml"
done
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
  run bench_ddp_b0_224 $PY benchmarks/bench_ddp.py --nproc "$NGPU" --size 224 --batches 20 --rounds 3 \
      --set train.model=efficientnet_b0 --set train.batch_size=$((64 * NGPU)) --set train.device=cuda
else
  echo "one GPU visible: DDP scaling not measured" | tee "$OUT/bench_ddp.log"
fi
if [ -f data/prepared/meta.json ]; then
  WORK=$(mktemp -d)
  LOCAL=(--set train.out=$WORK/models --set evaluate.out=$WORK/reports
         --set mlflow.tracking_uri=sqlite:///$WORK/mlflow.db --set mlflow.artifact_root=$WORK/artifacts)
  start=$(date +%s.%N)
  run train_default $PY -m src.train "${LOCAL[@]}"
  seconds_since "$start" > "$OUT/default_train_seconds.txt"
  echo "train wall time: $(cat "$OUT/default_train_seconds.txt") s" | tee -a "$OUT/train_default.log"
  run evaluate_default $PY -m src.evaluate "${LOCAL[@]}"
  cp "$WORK/reports/metrics.json" "$OUT/metrics_default.json" 2>/dev/null || true
  rm -rf "$WORK"
else
  echo "no data/prepared: default train on the GPU not run" | tee "$OUT/train_default.log"
fi
# 5. the whole pipeline, `dvc repro` from nothing, in a copy of the checkout (its outputs untouched)
if [ "${SKIP_REPRO:-0}" != 1 ]; then
  COPY=$(mktemp -d)
  tar --exclude=./.venv --exclude=./.dvc/cache --exclude=./mlruns --exclude=./models --exclude=./data/prepared \
      --exclude=./data/phantom --exclude=./data/phantom_masks --exclude=./localiser/folds -cf - . | tar -xf - -C "$COPY"
  HERE=$PWD
  cd "$COPY"
  start=$(date +%s.%N)
  PATH="$HERE/.venv/bin:$PATH" run dvc_repro dvc repro --force
  seconds_since "$start" > "$OUT/dvc_repro_seconds.txt"
  cd "$HERE"
  cp "$COPY/reports/metrics.json" "$OUT/metrics_repro.json" 2>/dev/null || true
  rm -rf "$COPY"
fi
# gpu.json: what the README's GPU table and issue 17's goals read
$PY - "$OUT" <<'PY' || status=1
import json, sys, pathlib, torch
out = pathlib.Path(sys.argv[1])
def number(name):
    f = out / name
    return round(float(f.read_text()), 1) if f.is_file() and f.read_text().strip() else None
profiles = [json.loads((out / f).read_text()) for f in
            ("bench_b0_224.json", "bench_b5_456.json", "bench_lab_crop.json", "bench_lab_full.json") if (out / f).is_file()]
compiled = [json.loads(f.read_text()) for f in sorted(out.glob("bench_b0_224_compile_*.json"))]
result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
          "profiles": profiles, "trainer_over_bare": {p["profile"]: round(p["trainer_over_bare"], 3) for p in profiles},
          "compile": [{k: c[k] for k in ("profile", "trainer_img_s", "bare_img_s", "trainer_over_bare", "peak_gpu_gib")}
                      for c in compiled],
          "default_train_seconds": number("default_train_seconds.txt"),
          "dvc_repro_seconds": number("dvc_repro_seconds.txt"),
          "goals": {"trainer_over_bare": 0.90, "default_train_seconds": 60}}
(out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
pathlib.Path("benchmarks/results/gpu.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: result[k] for k in ("device", "trainer_over_bare", "default_train_seconds", "dvc_repro_seconds")}))
PY
echo "gpu_check: exit status $status (logs in $OUT)"
exit $status
