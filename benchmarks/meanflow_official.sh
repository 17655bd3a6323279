#!/usr/bin/env bash
# Training throughput of the official MeanFlow PyTorch code (Gsunshine/py-meanflow) and of this library's
# MeanFlow on the same card, CIFAR-10, 128 images per GPU, on one GPU and on all of them.  Unattended; prints
# one line per run and a table, saves meanflow_official.json in $OUT (default runs/meanflow-official).
#
# Needs, on the GPU machine:
#   * the official code as an untracked folder: git clone https://github.com/Gsunshine/py-meanflow .official/py-meanflow
#     (.official/ is git-ignored: never commit it; the machine may be offline, so copy the folder there);
#   * its extra packages: torchvision, torchmetrics[image], tensorboard;
#   * CIFAR-10's python batches: $ONESTEP_CIFAR10 is the cifar-10-batches-py folder, whose parent is the
#     official code's --data_path (torchvision finds the batches there and downloads nothing);
#   * onestep's meanflow method (onestep/methods/meanflow.py); without it only the official side runs.
#
# The two sides train different networks (the official SongUNet, ~55M parameters, dropout, EDM augmentation;
# ours, the book's 12M-parameter U-Net), so the numbers compare the two setups as each paper's code runs them,
# not the frameworks; the official code is timed compiled (its default) and eager (--not_compile), ours eager.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/meanflow-official}
OFFICIAL=${OFFICIAL:-.official/py-meanflow}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-300}   # each official run is stopped after this long (its log has sec/iter)
STEPS=${STEPS:-600}                       # training steps of each of our runs
PER_GPU=128
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
mkdir -p "$OUT"
: "${ONESTEP_CIFAR10:?set ONESTEP_CIFAR10 to the cifar-10-batches-py folder}"
DATA_PATH=$(dirname "$(realpath "$ONESTEP_CIFAR10")")
results="$OUT/meanflow_official.jsonl"; : > "$results"

official() {  # $1 GPUs, $2 extra flags, $3 name
  local log="$OUT/$3.log"
  [ -d "$OFFICIAL/meanflow" ] || { echo "{\"run\": \"$3\", \"error\": \"no official code at $OFFICIAL\"}" >> "$results"; return; }
  (cd "$OFFICIAL/meanflow" && timeout "$SECONDS_PER_RUN" torchrun --standalone --nproc_per_node="$1" train.py \
     --output_dir="$(realpath "$OUT")/$3" --dataset=cifar10 --data_path="$DATA_PATH" --batch_size=$PER_GPU \
     --lr=0.0006 --eval_frequency=-1 --epochs=16000 --log_per_step=50 --tr_sampler=v1 --P_mean_t -0.6 --P_std_t 1.6 \
     --P_mean_r -4.0 --P_std_r 1.6 --warmup_epochs 200 --norm_p 0.75 --ratio 0.75 --dropout 0.2 --use_edm_aug $2) \
     > "$log" 2>&1
  # the last logged sec_per_iter (an average over 50 steps, long after the first, compiled step)
  python3 - "$log" "$3" "$1" >> "$results" <<'PY'
import json, re, sys
log, name, gpus = sys.argv[1], sys.argv[2], int(sys.argv[3])
found = re.findall(r"sec_per_iter = ([0-9.]+)", open(log).read())
row = {"run": name, "gpus": gpus, "global_batch": 128 * gpus}
if found:
    row.update(steps_per_second=1 / float(found[-1]), images_per_second=128 * gpus / float(found[-1]))
else:
    row["error"] = "no sec_per_iter in " + log
print(json.dumps(row))
PY
}

ours() {  # $1 GPUs, $2 name
  local launch=(python3 -m onestep)
  [ "$1" -gt 1 ] && launch=(torchrun --standalone --nproc_per_node="$1" -m onestep)
  if ! python3 -c "import onestep.methods.meanflow" 2>/dev/null; then
    echo "{\"run\": \"$2\", \"error\": \"onestep has no meanflow method in this checkout\"}" >> "$results"; return
  fi
  PYTHONPATH=$PWD ONESTEP_PROGRESS=0 "${launch[@]}" train --method meanflow --dataset cifar10 --scale full \
    --backend torch --steps "$STEPS" --batch-size $((PER_GPU * $1)) --eval-every 0 --eval-n 1000 \
    --out "$OUT/$2" --overwrite > "$OUT/$2.log" 2>&1
  python3 - "$OUT/$2" "$2" "$1" >> "$results" <<'PY'
import json, os, sys
run, name, gpus = sys.argv[1], sys.argv[2], int(sys.argv[3])
row = {"run": name, "gpus": gpus, "global_batch": 128 * gpus}
try:
    row.update(json.load(open(os.path.join(run, "metrics.json")))["throughput"])
except OSError:
    row["error"] = "the run failed; see " + run + ".log"
print(json.dumps(row))
PY
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for n in $(printf "%s\n" 1 "$GPUS" | sort -un); do
  official "$n" "" "official-compiled-${n}gpu"
  official "$n" "--not_compile" "official-eager-${n}gpu"
  ours "$n" "onestep-torch-${n}gpu"
done
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
json.dump(rows, open(sys.argv[1].replace(".jsonl", ".json"), "w"), indent=2)
print("| run | GPUs | global batch | steps/s | images/s |\n|---|---|---|---|---|")
for r in rows:
    rate = f"{r['steps_per_second']:.2f} | {r['images_per_second']:.0f}" if "steps_per_second" in r else f"{r.get('error')} | —"
    print(f"| {r['run']} | {r['gpus']} | {r['global_batch']} | {rate} |")
PY
