#!/usr/bin/env bash
# The supervised-contrastive benchmark on the embedded digits data (docs/supervised_contrastive.md):
# MoCo v2 and its In, Out and Suploss variants, each pretrained with the same recipe
# (configs/mocov2*_pt_digits_1n2c.yaml, NPROC processes, default 2), then kNN and linear evaluation of
# each pretrained backbone on the 360 held-out digits; prints the results table at the end.
# About 5 minutes per method on 2 CPU cores. Extra arguments go to every pretraining run.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
launch=(python -m paddle.distributed.launch --nproc_per_node "$NPROC" --log_dir output/launch_logs)
runs=(mocov2 mocov2_supcon_in mocov2_supcon_out mocov2_supcon_suploss)

for run in "${runs[@]}"; do
    "${launch[@]}" tools/train.py -c "configs/${run}_pt_digits_1n2c.yaml" "$@"
    weights=output/${run}_pt_digits/$(cat "output/${run}_pt_digits/latest")
    python tools/eval.py -c configs/moco_lincls_digits_1n2c.yaml -o Eval.protocol=knn \
        -o Model.model.base_encoder.pretrained="$weights" -o Engine.save_load.output_dir="output/knn_digits_$run"
    "${launch[@]}" tools/train.py -c configs/moco_lincls_digits_1n2c.yaml \
        -o Model.model.base_encoder.pretrained="$weights" -o Engine.save_load.output_dir="output/lincls_digits_$run"
    python tools/eval.py -c configs/moco_lincls_digits_1n2c.yaml \
        -o Model.model.base_encoder.pretrained="$weights" -o Engine.save_load.output_dir="output/lincls_digits_$run"
done
python tools/summarize_digits.py output --table "${runs[@]}"
