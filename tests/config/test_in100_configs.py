"""The ImageNet-100 configs are their ImageNet-1k bases with exactly the documented changes: the
class count, the list files tools/imagenet100.py writes, CMC's queue of 16384 keys, their own output
folders (whether the datasets read those lists: tests/data/test_imagenet100.py)."""
import pytest

from ppmoco.config import load_config


def flat(tree, prefix=""):
    """{dotted key: value} of every leaf of a resolved config."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changes(config, base):
    new, old = flat(load_config(config)), flat(load_config(base))
    assert new.keys() >= old.keys()
    return {key: value for key, value in new.items() if old.get(key, "<unset>") != value}


LISTS = "./dataset/ILSVRC2012/"


# Catches: a recipe value changed beyond the documented ones (lr, epochs, T, m, augmentation, batch),
# the queue left at 65536, the wrong list file or class count.
@pytest.mark.parametrize("config, base, expected", [
    ("mocov2_pt_in100_1n8c.yaml", "mocov2_pt_in1k_1n8c.yaml", {
        "Engine.save_load.output_dir": "./output/mocov2_pt_in100",
        "Model.model.K": 16384,
        "Data.Train.dataset.root": None,
        "Data.Train.dataset.image_root": LISTS,
        "Data.Train.dataset.cls_label_path": LISTS + "in100_train_list.txt",
        "Data.Train.dataset.class_num": 100,
        "Inference.model_dir": "./output/mocov2_pt_in100/inference"}),
    ("moco_lincls_in100_1n8c.yaml", "moco_lincls_in1k_1n8c.yaml", {
        "Engine.save_load.output_dir": "./output/moco_lincls_in100",
        "Model.model.base_encoder.pretrained": "./output/mocov2_pt_in100/epoch_200",
        "Model.model.num_classes": 100,
        "Data.Train.dataset.cls_label_path": LISTS + "in100_train_list.txt",
        "Data.Train.dataset.class_num": 100,
        "Data.Eval.dataset.cls_label_path": LISTS + "in100_val_list.txt",
        "Data.Eval.dataset.class_num": 100,
        "Inference.model_dir": "./output/moco_lincls_in100/inference"}),
])
def test_the_imagenet100_configs_change_only_the_documented_keys(config, base, expected):
    assert changes(config, base) == expected
