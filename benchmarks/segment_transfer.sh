#!/usr/bin/env bash
# Where the encoder comes from, on one generated set (docs/method.md, "Segmentation: where the
# encoder comes from"): val mIoU of `fcmae segment` from scratch, from an encoder `fcmae pretrain`
# made on the set's unlabelled training images, and from a classifier `fcmae finetune` made from
# that encoder on a class-folder version of the set (class = the largest shape). Run from an
# empty folder: bash /path/to/fcmae/benchmarks/segment_transfer.sh; writes segment_transfer.png.
# CPU, one thread: about 10 minutes.
set -e
REPO=$(cd "$(dirname "$0")/.." && pwd)
F=$REPO/.venv/bin/fcmae
PY=$REPO/.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
$PY "$REPO/scripts/segmentation_demo.py" data/shapes-seg --train 64 --val 16 --classify data/shapes-cls \
    --unlabelled data/shapes-raw
$F pretrain --model atto --data data/shapes-raw --input-size 64 --batch-size 16 --epochs 200 --warmup-epochs 10 \
    --workers 0 --accelerator cpu --output runs/pre > pre.log 2>&1
$F finetune --model atto --data data/shapes-cls --pretrained runs/pre/encoder.safetensors --input-size 64 \
    --batch-size 16 --effective-batch 16 --epochs 30 --workers 0 --accelerator cpu --output runs/ft > ft.log 2>&1
SEG="--model atto --data data/shapes-seg --input-size 64 --batch-size 8 --effective-batch 8 --channels 64
     --aux-channels 32 --iterations 200 --workers 0 --accelerator cpu"
$F segment $SEG --output runs/seg-scratch > seg-scratch.log 2>&1
$F segment $SEG --pretrained runs/pre/encoder.safetensors --output runs/seg-pre > seg-pre.log 2>&1
$F segment $SEG --pretrained runs/ft/classifier.safetensors --output runs/seg-ft > seg-ft.log 2>&1
$PY - <<'PLOT'
import json
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
runs = {"from scratch": "runs/seg-scratch", "fcmae pretrain encoder": "runs/seg-pre",
        "fine-tuned classifier": "runs/seg-ft"}
fig, ax = plt.subplots(figsize=(6, 3.5))
for label, run in runs.items():
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    ax.plot([r["step"] for r in rows], [r["mIoU"] for r in rows], marker="o", label=label)
    print(f"{label}: best val mIoU {max(r['mIoU'] for r in rows):.2f}, last {rows[-1]['mIoU']:.2f}")
ax.set(xlabel="iteration", ylabel="val mIoU (%)", title="atto UperNet, 64 generated images of 64 px")
ax.legend()
fig.tight_layout()
fig.savefig("segment_transfer.png", dpi=120)
PLOT
