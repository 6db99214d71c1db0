#!/usr/bin/env bash
# The main job on the embedded digits data, end to end on one machine:
#   1. MoCo v2 pretraining (configs/mocov2_pt_digits_1n2c.yaml, NPROC processes, default 2);
#   2. kNN and linear evaluation of the pretrained backbone and, as the baseline, of the same
#      backbone with random weights;
#   3. a report with the results table and pictures (augmented views, pretraining curves, t-SNE of
#      both backbones' features): output/digits_demo/report.md.
# Extra arguments are passed to the pretraining run, e.g. -o Engine.num_train_epochs=20.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
launch=(python -m paddle.distributed.launch --nproc_per_node "$NPROC" --log_dir output/launch_logs)

"${launch[@]}" tools/train.py -c configs/mocov2_pt_digits_1n2c.yaml "$@"
pretrained=output/mocov2_pt_digits/$(cat output/mocov2_pt_digits/latest)

for init in pretrained random; do
    weights=$pretrained
    [ "$init" = random ] && weights=null
    python tools/eval.py -c configs/moco_lincls_digits_1n2c.yaml -o Eval.protocol=knn \
        -o Model.model.base_encoder.pretrained="$weights" -o Engine.save_load.output_dir="output/knn_digits_$init"
    "${launch[@]}" tools/train.py -c configs/moco_lincls_digits_1n2c.yaml \
        -o Model.model.base_encoder.pretrained="$weights" -o Engine.save_load.output_dir="output/lincls_digits_$init"
    python tools/eval.py -c configs/moco_lincls_digits_1n2c.yaml \
        -o Model.model.base_encoder.pretrained="$weights" -o Engine.save_load.output_dir="output/lincls_digits_$init"
done
python tools/show_views.py -c configs/mocov2_pt_digits_1n2c.yaml --num 6 --size 64 --out output/digits_demo/views.png
for init in pretrained random; do
    python tools/plot.py "output/lincls_digits_$init" --tsne --size 700x700 --out "output/digits_demo/tsne_$init.png"
done
python tools/summarize_digits.py output
