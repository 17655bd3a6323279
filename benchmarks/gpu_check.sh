#!/usr/bin/env bash
# One prepared GPU check (run on a lent GPU machine from the repo root, $OUT set):
# card and versions, FM vs JVP-probe step times per backend, and FM on MNIST at a
# shortened full preset in each backend (steps/s, samples/s, classifier FD).
# The machine has torch, jax, equinox, optax, scipy, sklearn; MNIST files and the cached
# MNIST reference classifier travel in .gpu/ (see the closing note of the foundation issue).
set -uo pipefail
export PYTHONPATH="$PWD:$PWD/.gpu/site" ONESTEP_CACHE="$PWD/.gpu/cache" PYTHONUNBUFFERED=1
STEPS=${STEPS:-3000}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, jax, equinox, optax; print('torch', torch.__version__, 'jax', jax.__version__, jax.devices(), 'equinox', equinox.__version__)"
[ -n "${SKIP_BENCH:-}" ] || python3 benchmarks/run.py --device cuda --only steps --nets mlp-2d,unet-mnist --batch 256 --steps 50 \
  --json "$OUT/bench_gpu.json" 2>&1 | grep -v Warning
for b in torch jax; do
  start=$SECONDS
  python3 -m onestep train --method fm --backend "$b" --dataset mnist --scale full --conditional \
    --steps "$STEPS" --ema-decay "${EMA:-0.999}" --out "$OUT/fm-mnist-$b" 2>&1 | grep -v Warning | tail -12
  echo "$b train+eval wall: $((SECONDS - start)) s"
  python3 - "$b" <<'PY'
import json, os, sys, time
from onestep.runs import load_run, sample_run
bk, model, preset, _ = load_run(os.path.join(os.environ["OUT"], f"fm-mnist-{sys.argv[1]}"))
for n, steps in ((1000, 16), (4000, 16)):
    sample_run(bk, model, preset, n=n, seed=0, steps=1, solver="heun")  # warm-up: compiles for this n
    t = time.perf_counter(); x, _ = sample_run(bk, model, preset, n=n, seed=1, steps=steps, solver="heun")
    dt = time.perf_counter() - t
    print(f"{sys.argv[1]} sampling: {n} images, Heun {steps} steps (NFE {2 * steps}) in {dt:.2f} s = {n / dt:.0f} samples/s")
m = json.load(open(os.path.join(os.environ["OUT"], f"fm-mnist-{sys.argv[1]}", "metrics.json")))
print(sys.argv[1], "train steps/s", round(m["steps"] / m["train_seconds"], 1), "eval", m["eval"])
PY
  rm -f "$OUT/fm-mnist-$b/checkpoint"
done
# Every method's full CIFAR-10 preset for a few minutes per backend, on one device and on all of them
# (steps/s, images/s, peak memory, FID-10k); needs the CIFAR-10 batches in $ONESTEP_CIFAR10.
if [ -n "${ONESTEP_CIFAR10:-}" ]; then
  python3 benchmarks/scale_check.py --out "$OUT/scale" --steps "${SCALE_STEPS:-2000}" 2>&1 | grep -v Warning
else
  echo "scale check skipped: set ONESTEP_CIFAR10 to a cifar-10-batches-py folder"
fi
