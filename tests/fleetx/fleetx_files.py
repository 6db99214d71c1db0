"""PaddleFleetX's MoCo config files, written out for tests: every key, value and `_base_` link of
PaddleFleetX v2.4.1's ppfleetx/configs/vis/base.yaml and vis/moco/{mocov1_pt,mocov2_pt,moco_lincls}
_in1k_1n8c.yaml (unchanged since their first release, v2.4.0), recomposed here from their keys.

`write_fleetx_configs(folder)` writes them as FleetX ships them (ResNet-50, 224 px, ImageNet paths);
`tiny=` replaces only what a test on CPU must: data paths, sizes and the device.
"""
import copy

import yaml

BASE = {
    "Global": {"device": "gpu", "seed": 2021, "global_batch_size": None, "local_batch_size": 1,
               "micro_batch_size": 1,
               "flags": {"FLAGS_enable_cublas_tensor_op_math": True,
                         "FLAGS_gemm_use_half_precision_compute_type": False}},
    "Engine": {"run_mode": "epoch", "max_steps": -1, "eval_freq": 1, "eval_iters": -1, "test_iters": -1,
               "save_load": {"save_steps": -1, "save_epoch": 1, "output_dir": "./output", "ckpt_dir": None}},
    "Distributed": {"dp_degree": None, "mp_degree": 1, "pp_degree": 1,
                    "sharding": {"sharding_degree": 1, "sharding_stage": 1, "sharding_offload": False,
                                 "reduce_overlap": False, "broadcast_overlap": False}},
    "Model": {"use_recompute": False},
    "Fused": {"tensor_fusion": False},
    "Profiler": {"enable": False, "scheduler": [1, 5], "profiler_log": "profiler_log", "detailed": False},
    "Inference": {"model_dir": "./output", "mp_degree": 1},
}


def _engine(epochs, eval_freq, eval_iters):
    return {"run_mode": "epoch", "num_train_epochs": epochs, "eval_freq": eval_freq, "eval_iters": eval_iters,
            "accumulate_steps": 1, "logging_freq": 10,
            "mix_precision": {"enable": False, "scale_loss": 32768.0,
                              "custom_black_list": ["reduce_sum", "elementwise_div"], "custom_white_list": []},
            "save_load": {"save_epoch": 1, "output_dir": "./output", "ckpt_dir": None}}


def _resnet(**extra):
    return {"name": "resnet50", "with_pool": False, "num_classes": 0, **extra}


def _classifier(with_pool, num_features, num_classes):
    return {"name": "MoCoClassifier", "with_pool": with_pool, "num_features": num_features,
            "num_classes": num_classes}


def _op(name, **kwargs):
    return {name: kwargs or None}


DECODE = _op("DecodeImage", to_rgb=True, channel_first=False)
NORMALIZE = _op("NormalizeImage", scale="1.0/255.0", mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], order="")
LOADER = {"num_workers": 8, "use_shared_memory": True}


def _sampler(batch_size, train):
    return {"name": "DistributedBatchSampler", "batch_size": batch_size, "drop_last": train, "shuffle": train}


def _pretraining(version):
    crop = _op("RandCropImage", size=224, scale=[0.2, 1.0], interpolation="bicubic", backend="pil")
    if version == 1:
        model = {"base_encoder": _resnet(), "base_classifier": _classifier(True, 2048, 128),
                 "momentum_encoder": _resnet(), "momentum_classifier": _classifier(True, 2048, 128)}
        lr = {"name": "MultiStepDecay", "run_mode": "epoch", "learning_rate": 0.03, "gamma": 0.1,
              "milestones": [120, 160]}
        ops = [DECODE, crop, _op("RandomGrayscale", p=0.2),
               _op("ColorJitter", brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4),
               _op("RandFlipImage", flip_code=1), NORMALIZE, _op("ToCHWImage")]
    else:
        projector = {"name": "MoCoV2Projector", "in_dim": 2048, "out_dim": 2048, "with_pool": True}
        model = {"T": 0.2, "base_encoder": _resnet(), "base_projector": projector,
                 "base_classifier": _classifier(False, 2048, 128), "momentum_encoder": _resnet(),
                 "momentum_projector": dict(projector), "momentum_classifier": _classifier(False, 2048, 128)}
        lr = {"name": "CosineDecay", "run_mode": "epoch", "update_unit": "epoch", "learning_rate": 0.03}
        ops = [DECODE, crop,
               _op("ColorJitter", brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
               _op("RandomGrayscale", p=0.2), _op("GaussianBlur", sigma=[0.1, 2.0], p=0.5),
               _op("RandFlipImage", flip_code=1), NORMALIZE, _op("ToCHWImage")]
    return {
        "_base_": "../base.yaml",
        "Global": {"device": "gpu", "seed": 2022},
        "Engine": _engine(200, -1, 0),
        "Distributed": {"dp_degree": None},
        "Model": {"module": "MOCOModule", "model": model, "loss": {"train": {"name": "CELoss"}}},
        "Optimizer": {"name": "Momentum", "momentum": 0.9, "weight_decay": 0.0001, "lr": lr},
        "Data": {"Train": {"dataset": {"name": "ContrativeLearningDataset", "root": "./dataset/ILSVRC2012/train",
                                       "transform_ops": ops},
                           "sampler": _sampler(32, True), "loader": dict(LOADER)}},
    }


def _lincls():
    def dataset(list_name, ops, class_num=True):
        return {"name": "GeneralClsDataset", "image_root": "./dataset/ILSVRC2012/",
                **({"class_num": 1000} if class_num else {}),
                "cls_label_path": f"./dataset/ILSVRC2012/{list_name}", "transform_ops": ops}
    train_ops = [DECODE, _op("RandCropImage", size=224, interpolation="bilinear", backend="pil"),
                 _op("RandFlipImage", flip_code=1), NORMALIZE, _op("ToCHWImage")]
    eval_ops = [DECODE, _op("ResizeImage", resize_short=256, interpolation="bilinear", backend="pil"),
                _op("CenterCropImage", size=224), NORMALIZE, _op("ToCHWImage")]
    topk = {"name": "TopkAcc", "topk": [1, 5]}
    return {
        "_base_": "../base.yaml",
        "Global": {"device": "gpu", "seed": 2022},
        "Engine": _engine(100, 1, 1),
        "Distributed": {"dp_degree": None},
        "Model": {"module": "MOCOClsModule",
                  "model": {"base_encoder": _resnet(pretrained="./pretrained/mocov2/model"),
                            "base_classifier": _classifier(True, 2048, 1000)},
                  "loss": {"train": {"name": "CELoss"}, "eval": {"name": "CELoss"}},
                  "metric": {"train": dict(topk), "eval": dict(topk)}},
        "Optimizer": {"name": "Momentum", "momentum": 0.9, "weight_decay": 0.0,
                      "lr": {"name": "MultiStepDecay", "run_mode": "epoch", "learning_rate": 30.0, "gamma": 0.1,
                             "milestones": [60, 80]}},
        "Data": {"Train": {"dataset": dataset("train_list.txt", train_ops), "sampler": _sampler(32, True),
                           "loader": dict(LOADER)},
                 "Eval": {"dataset": dataset("val_list.txt", eval_ops, class_num=False),
                          "sampler": _sampler(64, False), "loader": dict(LOADER)}},
    }


NAMES = ("mocov1_pt_in1k_1n8c.yaml", "mocov2_pt_in1k_1n8c.yaml", "moco_lincls_in1k_1n8c.yaml")


def fleetx_configs():
    """{relative path: config tree} of the four files, as FleetX ships them."""
    return {"base.yaml": copy.deepcopy(BASE), f"moco/{NAMES[0]}": _pretraining(1),
            f"moco/{NAMES[1]}": _pretraining(2), f"moco/{NAMES[2]}": _lincls()}


def shrink(tree, widths=(4, 8, 8, 8), image_size=32, batch_size=8, K=16, dim=16, data=None, pretrained=None):
    """`tree` with CPU-test sizes, data paths and device; every other key and value stays FleetX's.

    `data`: {"root": pretraining folder, "image_root", "train_list", "val_list", "num_classes"}.
    The encoders become a ResNet-18 of `widths`, the heads keep their structure at matching sizes.
    """
    tree, data = copy.deepcopy(tree), data or {}
    if "Global" in tree:
        tree["Global"]["device"] = "cpu"
    model = tree.get("Model", {}).get("model", {})
    width = widths[-1]
    for key in ("base_encoder", "momentum_encoder"):
        if key in model:
            model[key].update(name="resnet18", widths=list(widths))
            if "pretrained" in model[key]:
                model[key]["pretrained"] = pretrained
    for key in ("base_projector", "momentum_projector"):
        if key in model:
            model[key].update(in_dim=width, out_dim=2 * width)
    pretraining = "momentum_encoder" in model
    for key in ("base_classifier", "momentum_classifier"):
        if key in model:
            model[key]["num_features"] = 2 * width if "base_projector" in model else width
            model[key]["num_classes"] = dim if pretraining else data["num_classes"]
    if pretraining:
        model["K"] = K
    for split, section in tree.get("Data", {}).items():
        section["sampler"]["batch_size"] = batch_size
        section["loader"]["num_workers"] = 0
        dataset = section["dataset"]
        if "root" in dataset:
            dataset["root"] = data["root"]
        if "image_root" in dataset:
            dataset["image_root"] = data["image_root"]
            dataset["cls_label_path"] = data["train_list" if split == "Train" else "val_list"]
        if "class_num" in dataset:
            dataset["class_num"] = data["num_classes"]
        for op in dataset["transform_ops"]:
            (kwargs,) = op.values()
            if kwargs and "size" in kwargs:
                kwargs["size"] = image_size
            if kwargs and "resize_short" in kwargs:
                kwargs["resize_short"] = image_size * 8 // 7
    return tree


def write_configs(folder, trees):
    for relative, tree in trees.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return folder / "moco"
