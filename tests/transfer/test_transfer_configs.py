"""configs/transfer/ holds other frameworks' configs: readable as such, and never taken for ppmoco's."""
import ast
import os

import yaml

from ppmoco.config import CONFIG_DIR, shipped_configs

TRANSFER = os.path.join(CONFIG_DIR, "transfer")


def test_shipped_configs_lists_no_transfer_config():
    names = shipped_configs()
    # catches: shipped_configs() walking subfolders (transfer/ files would be offered as ppmoco runs)
    assert names and all(os.sep not in name and "/" not in name for name in names)
    assert not set(names) & set(os.listdir(TRANSFER))


def test_each_framework_config_parses_in_its_own_syntax():
    files = sorted(os.listdir(TRANSFER))
    assert files == ["detectron2_pascal_voc_R_50_C4_24k_moco.yaml", "mmdet_mask-rcnn_r50_fpn_mocov2.py",
                     "paddleclas_ResNet50_moco_finetune.yaml", "paddledet_mask_rcnn_r50_fpn_1x_coco_moco.yml"]
    for name in files:
        with open(os.path.join(TRANSFER, name), encoding="utf-8") as f:
            text = f.read()
        if name.endswith(".py"):
            ast.parse(text, name)  # mmdetection configs are Python
        else:
            assert isinstance(yaml.safe_load(text), dict), name
