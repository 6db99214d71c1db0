# mmdetection 3.x: Mask R-CNN R50-FPN, 1x schedule on COCO, from a ppmoco backbone.
# Not a ppmoco config: copy it into mmdetection's configs/selfsup_pretrain/ and train there:
#     python tools/convert.py output/mocov2_pt_in1k_1n8c/epoch_200 mocov2_r50_pretrain.pth --to torchvision
#     bash tools/dist_train.sh configs/selfsup_pretrain/mmdet_mask-rcnn_r50_fpn_mocov2.py 8
# These are the backbone settings of mmdetection's own MoCo v2 recipe (configs/selfsup_pretrain/,
# Mask R-CNN 1x: box AP 38.0, mask AP 34.3 with the official MoCo v2 800-epoch weights).
_base_ = [
    '../_base_/models/mask-rcnn_r50_fpn.py',
    '../_base_/datasets/coco_instance.py',
    '../_base_/schedules/schedule_1x.py',
    '../_base_/default_runtime.py',
]

model = dict(
    # MoCo saw RGB images normalised with ImageNet's mean/std; mmdetection decodes BGR, so convert
    # (the base model already says this; restated because the backbone depends on it).
    data_preprocessor=dict(
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True),
    backbone=dict(
        # 0 freezes the stem (conv1, bn1) only, as mmdetection's MoCo recipe; -1 trains it too, as
        # MoCo's own detectron2 protocol (FREEZE_AT: 0) and mmselfsup's benchmarks do. The base
        # model's 1 would also freeze layer1, tuned for supervised ImageNet weights.
        frozen_stages=0,
        # Self-supervised features are not calibrated to a detector's data: BatchNorm must keep
        # learning (norm_eval=False) and, on small per-GPU batches, learn across GPUs (SyncBN).
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        norm_eval=False,
        # The file tools/convert.py --to torchvision wrote (torchvision names, "pytorch" style).
        init_cfg=dict(type='Pretrained', checkpoint='./mocov2_r50_pretrain.pth')))
