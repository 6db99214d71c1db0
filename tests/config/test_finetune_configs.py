"""The fine-tuning configs (configs/benchmarks/finetune_*.yaml) hold mmselfsup's recipes and build: the module
(ResNet-50 at the published sizes), its learning-rate groups, the subset keys, and the pretrained key spelled
as the linear probe's configs spell it."""
import os

import pytest

from ppmoco.config import load_config
from ppmoco.optimizers import build_optimizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TRAIN_224 = [{"RandCropImage": {"size": 224}}, {"RandFlipImage": {"flip_code": 1}},
             {"NormalizeImage": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}, {"ToCHWImage": None}]
EVAL_224 = [{"ResizeImage": {"resize_short": 256}}, {"CenterCropImage": {"size": 224}},
            {"NormalizeImage": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}, {"ToCHWImage": None}]
# config -> (split file, weight decay, lr, head multiplier, epochs, milestones, gamma): mmselfsup's
# imagenet_{1,10}percent/r50_lr0_01_head100.py + base.py, and resnet50_8xb32-steplr-90e_in1k.py.
RECIPES = {
    "finetune_in1k_1percent_r50_1n8c": ("1percent.txt", 5e-4, 0.01, 100.0, 20, [12, 16], 0.2),
    "finetune_in1k_10percent_r50_1n8c": ("10percent.txt", 1e-4, 0.01, 100.0, 20, [12, 16], 0.2),
    "finetune_in1k_r50_1n8c": (None, 1e-4, 0.1, None, 90, [30, 60, 90], 0.1),
}


def config(name, *overrides):
    return load_config(os.path.join(ROOT, "configs", "benchmarks", f"{name}.yaml"), list(overrides))


# Catches: a recipe value off mmselfsup's (lr, head multiplier, weight decay, schedule, epochs), a global batch
# other than 256 (8 x 32), augmentations other than RandomResizedCrop + flip / Resize 256 + CenterCrop 224,
# the semi-supervised configs without their split file (training on every label), and the full one with it.
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_imagenet_configs_are_mmselfsups_recipes(name):
    split, decay, lr, head, epochs, milestones, gamma = RECIPES[name]
    cfg = config(name)
    opt, train = cfg["Optimizer"], cfg["Data"]["Train"]
    assert (opt["name"], opt["momentum"], opt["use_nesterov"], opt["weight_decay"]) == ("Momentum", 0.9, False, decay)
    assert opt["lr"] == {"name": "MultiStepDecay", "learning_rate": lr, "milestones": milestones, "gamma": gamma}
    assert opt["lr_mult"] == ({"classifier": head} if head else {})
    assert opt["exclude_from_weight_decay"] == []
    assert cfg["Engine"]["num_train_epochs"] == epochs and train["sampler"]["batch_size"] * 8 == 256
    assert train["dataset"]["transform_ops"] == TRAIN_224
    assert cfg["Data"]["Eval"]["dataset"]["transform_ops"] == EVAL_224
    assert os.path.basename(train["dataset"].get("split_file") or "None") == str(split)
    model = cfg["Model"]
    assert model["module"] == "GeneralClsModule" and model["model"]["num_classes"] == 1000
    assert model["model"]["base_encoder"]["name"] == "resnet50" and model["loss"]["train"]["epsilon"] is None
    assert cfg["Eval"]["protocol"] == "linear"


# Catches: a pretrained key spelled otherwise than the linear probe's configs spell it (the documented
# `-o Model.model.base_encoder.pretrained=PATH` would then set a key the module never reads), an override
# that does not reach the module, and a split file path that cannot be overridden.
def test_pretrained_and_the_split_file_are_set_as_the_linear_configs_set_them():
    probe = load_config(os.path.join(ROOT, "configs", "moco_lincls_in1k_1n8c.yaml"))
    cfg = config("finetune_in1k_1percent_r50_1n8c", "Model.model.base_encoder.pretrained=/w/mocov2.pdparams",
                 "Data.Train.dataset.split_file=/data/1percent.txt")
    assert set(cfg["Model"]["model"]["base_encoder"]) == set(probe["Model"]["model"]["base_encoder"])
    assert cfg["Model"]["model"]["base_encoder"]["pretrained"] == "/w/mocov2.pdparams"
    assert cfg["Data"]["Train"]["dataset"]["split_file"] == "/data/1percent.txt"
    for name in RECIPES:
        assert config(name)["Model"]["model"]["base_encoder"]["pretrained"] == \
            probe["Model"]["model"]["base_encoder"]["pretrained"]


# Catches: the head's multiplier reaching no parameter (a rule the head's names do not hold), or the backbone
# (every parameter at 100x), on the real ResNet-50 the config builds; and the random-init baseline (pretrained
# null) not building.
def test_the_1percent_module_trains_its_head_at_100x_the_backbones_rate():
    from ppmoco.modules import build_module

    cfg = config("finetune_in1k_1percent_r50_1n8c", "Model.model.base_encoder.pretrained=null")
    module = build_module(cfg["Model"])
    opt = build_optimizer(cfg["Optimizer"], module, 0.01)
    groups = {g["learning_rate"]: g["params"] for g in opt._param_groups}
    head = {id(p) for p in module.classifier.parameters()}
    assert sorted(groups) == [1.0, 100.0] and {id(p) for p in groups[100.0]} == head
    assert len(groups[1.0]) == len(module.trainable_parameters()) - 2 == 159  # ResNet-50: 53 convs, 53 BNs x 2


# config -> (fraction, images, lr, head multiplier): mmselfsup's grid point chosen for each (the configs' comments).
DIGITS = {"finetune_digits_1percent_1n2c": (0.01, 14, 0.001, 100.0),
          "finetune_digits_10percent_1n2c": (0.1, 144, 0.01, 10.0)}


# Catches: a digits config whose global batch exceeds its subset (no step at all: the Engine refuses it), or
# drops images every epoch; a fraction other than the one its name states; and a baseline that cannot be asked
# for by pretrained=null.
@pytest.mark.parametrize("name", sorted(DIGITS))
def test_the_digits_configs_draw_their_fraction_and_step_over_all_of_it(name):
    fraction, images, lr, head = DIGITS[name]
    assert round(fraction * 1437) == images  # the embedded training digits
    cfg = config(name)
    train = cfg["Data"]["Train"]
    assert train["dataset"]["label_fraction"] == fraction and train["dataset"].get("split_file") is None
    assert images % (2 * train["sampler"]["batch_size"]) == 0
    assert cfg["Optimizer"]["lr_mult"] == {"classifier": head} and cfg["Optimizer"]["lr"]["learning_rate"] == lr
    assert cfg["Model"]["module"] == "GeneralClsModule"
    assert config(name, "Model.model.base_encoder.pretrained=null")["Model"]["model"]["base_encoder"]["pretrained"] \
        is None
