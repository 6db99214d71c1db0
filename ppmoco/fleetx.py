"""PaddleFleetX's way of describing a MoCo model, turned into ppmoco's module arguments.

FleetX's MoCo configs (ppfleetx/configs/vis/moco/*.yaml) build each encoder from three parts:
`base_encoder` (a headless ResNet), `base_projector` (v2 only: MoCoV2Projector, Linear + ReLU) and
`base_classifier` (MoCoClassifier, the last Linear), with `momentum_*` copies for the key encoder.
ppmoco writes the same networks as `base_encoder`, `projector.hidden_dim` and `dim`:

    FleetX v2: base_projector {in_dim: 2048, out_dim: 2048} + base_classifier {num_classes: 128}
    ppmoco v2: projector {hidden_dim: 2048}, dim: 128          (v1: no projector, dim = num_classes)

The linear-evaluation module's `base_classifier.num_classes` is its `num_classes`, and FleetX's
`Model.loss` / `Model.metric` sections name the cross-entropy and top-k accuracy the modules compute;
FleetX's label smoothing, `Model.loss.train.epsilon`, is the fine-tuning module's (GeneralClsModule).
Everything is checked here, once: the momentum parts must mirror the base parts (the key encoder is
a copy of the query encoder), and the layer sizes must chain (in_dim = the backbone's width).
Pooling always ends ppmoco's backbone, so the parts' `with_pool` flags only have to be booleans.
"""
import paddle

from ppmoco.errors import ConfigError
from ppmoco.models import build_backbone
from ppmoco.registry import is_number

# The classifiers (names and aliases), whose top-k Model.metric sets.
CLASSIFIERS = ("MOCOClsModule", "LinearEval", "MOCOMultiHeadClsModule", "MultiHeadLinear", "GeneralClsModule",
               "FineTune")
# The fine-tuning module (names and alias), whose label smoothing is Model.loss.train.epsilon (FleetX's CELoss).
FINETUNE = ("GeneralClsModule", "FineTune")
# FleetX's GeneralClsModule's own model keys (a ViT by name, ppfleetx/models/vision_model).
FLEETX_CLS_KEYS = ("name", "class_num", "drop_rate")
PARTS = ("base_projector", "base_classifier", "momentum_encoder", "momentum_projector", "momentum_classifier")
PART_NAMES = {"projector": "MoCoV2Projector", "classifier": "MoCoClassifier"}
PART_KEYS = {"projector": ("name", "in_dim", "out_dim", "with_pool"),
             "classifier": ("name", "num_features", "num_classes", "with_pool")}


def uses_fleetx_parts(model_args):
    return any(part in model_args for part in PARTS)


def module_args(module_name, model_section):
    """ppmoco's keyword arguments for `module_name` from the `Model` section (FleetX's or ppmoco's)."""
    args = dict(model_section["model"])
    loss = model_section.get("loss", {})  # absent in a section built by code, not load_config
    if module_name in FINETUNE:
        _finetune_args(args, loss)
    else:
        _check_loss(loss)
    metric = model_section.get("metric", {"train": {"topk": [1, 5]}, "eval": {"topk": [1, 5]}})
    if "topk" in args:
        raise ConfigError("Model.model.topk: set the reported top-k as Model.metric.train.topk and "
                          "Model.metric.eval.topk")
    if module_name in CLASSIFIERS:
        args["topk"] = _metric_topk(metric)
    elif any(spec["topk"] != [1, 5] for spec in metric.values()):  # the schema default
        raise ConfigError(f"Model.metric: {module_name} reports the top-1/top-5 accuracy of its "
                          "contrastive task; Model.metric applies to MOCOClsModule and "
                          "MOCOMultiHeadClsModule only, remove it")
    if not uses_fleetx_parts(args):
        return args
    if module_name in ("MOCOModule", "MoCo"):
        return _moco_args(args)
    if module_name in ("MOCOClsModule", "LinearEval"):
        return _linear_args(args)
    raise ConfigError(f"Model.model: FleetX's {'/'.join(p for p in PARTS if p in args)} describe MoCo "
                      f"models; {module_name} takes its own arguments, remove them")


def _check_loss(loss):
    for phase, spec in loss.items():
        if spec["epsilon"] not in (None, 0, 0.0):
            raise ConfigError(f"Model.loss.{phase}.epsilon: label smoothing is not part of MoCo or its "
                              "linear evaluation (facebookresearch/moco uses plain cross-entropy); remove it")


def _finetune_args(args, loss):
    """The fine-tuning module's `label_smoothing` from Model.loss.train.epsilon, checked, into `args`."""
    fleetx = [key for key in FLEETX_CLS_KEYS if key in args]
    if fleetx:
        raise ConfigError(f"Model.model.{fleetx[0]}: FleetX's GeneralClsModule names its network in Model.model; "
                          "ppmoco's takes base_encoder {name, pretrained} and num_classes (docs/finetune.md)")
    if "label_smoothing" in args:
        raise ConfigError("Model.model.label_smoothing: set the label smoothing as Model.loss.train.epsilon "
                          "(FleetX's CELoss key)")
    if loss.get("eval", {}).get("epsilon") not in (None, 0, 0.0):
        raise ConfigError("Model.loss.eval.epsilon: validation reports top-k accuracy, not a loss; remove it "
                          "(Model.loss.train.epsilon smooths the training labels)")
    epsilon = loss.get("train", {}).get("epsilon")
    if epsilon is not None and not is_number(epsilon):
        raise ConfigError(f"Model.loss.train.epsilon: expected a number in [0, 1), got {epsilon!r}")
    if epsilon is not None:
        args["label_smoothing"] = epsilon


def _metric_topk(metric):
    train, evaluation = metric["train"]["topk"], metric["eval"]["topk"]
    if train != evaluation:
        raise ConfigError(f"Model.metric.eval.topk: {evaluation} differs from Model.metric.train.topk "
                          f"{train}; ppmoco reports the same top-k in training and evaluation")
    return list(train)


def _part(args, key, kind):
    """The FleetX part `key` as a checked mapping of its known keys (None when absent)."""
    spec = args.pop(key, None)
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"Model.model.{key}: expected a mapping with a 'name' key, got {spec!r}")
    unknown = sorted(set(spec) - set(PART_KEYS[kind]))
    if unknown:
        raise ConfigError(f"Model.model.{key}.{unknown[0]}: unknown key; valid keys: {', '.join(PART_KEYS[kind])}")
    if spec.get("name") != PART_NAMES[kind]:
        raise ConfigError(f"Model.model.{key}.name: {spec.get('name')!r}; FleetX's MoCo {kind} is "
                          f"{PART_NAMES[kind]}")
    for size in PART_KEYS[kind][1:3]:
        value = spec.get(size)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ConfigError(f"Model.model.{key}.{size}: expected an int > 0, got {value!r}")
    if not isinstance(spec.get("with_pool", False), bool):
        raise ConfigError(f"Model.model.{key}.with_pool: expected true/false, got {spec['with_pool']!r}")
    return spec


def _mirror(args, base_key, base, momentum_key):
    """Pop the momentum part and require it to equal its base part."""
    momentum = args.pop(momentum_key, None)
    if momentum != base:
        differing = sorted(k for k in set(base or {}) | set(momentum or {})
                           if (base or {}).get(k) != (momentum or {}).get(k)) if base and momentum else []
        where = f" ({', '.join(differing)} differ)" if differing else ""
        raise ConfigError(f"Model.model.{momentum_key}: must mirror {base_key}{where}; the key encoder is a "
                          f"momentum copy of the query encoder, so give both the same value")


def _backbone_width(encoder):
    """Feature width of the backbone `encoder` describes (LazyGuard: no weights are initialised)."""
    with paddle.LazyGuard():
        return build_backbone(encoder, "Model.model.base_encoder").out_dim


def _moco_args(args):
    encoder = args.get("base_encoder")
    width = _backbone_width(encoder)
    if "projector" in args or "dim" in args:
        raise ConfigError("Model.model: set FleetX's base_projector/base_classifier or ppmoco's "
                          "projector/dim, not both")
    projector = _part(args, "base_projector", "projector")
    classifier = _part(args, "base_classifier", "classifier")
    if classifier is None:
        raise ConfigError("Model.model.base_classifier: missing; MoCo's last layer, e.g. "
                          "{name: MoCoClassifier, num_features: 2048, num_classes: 128}")
    mirrored = {k: v for k, v in encoder.items() if k != "pretrained"}
    momentum_encoder = args.get("momentum_encoder")
    if isinstance(momentum_encoder, dict):
        args["momentum_encoder"] = {k: v for k, v in momentum_encoder.items() if k != "pretrained"}
    _mirror(args, "base_encoder", mirrored, "momentum_encoder")
    _mirror(args, "base_projector", projector, "momentum_projector")
    _mirror(args, "base_classifier", classifier, "momentum_classifier")
    if projector is not None:
        _chain("base_projector.in_dim", projector["in_dim"], "the backbone's width", width)
        width = projector["out_dim"]
        args["projector"] = {"hidden_dim": projector["out_dim"]}
    _chain("base_classifier.num_features", classifier["num_features"],
           "base_projector.out_dim" if projector else "the backbone's width", width)
    args["dim"] = classifier["num_classes"]
    return args


def _linear_args(args):
    classifier = _part(args, "base_classifier", "classifier")
    others = [p for p in PARTS if p in args]
    if others:
        raise ConfigError(f"Model.model.{others[0]}: linear evaluation trains one classifier on the frozen "
                          "backbone; remove it")
    if classifier is None:
        raise ConfigError("Model.model.base_classifier: missing; the linear classifier, e.g. "
                          "{name: MoCoClassifier, num_features: 2048, num_classes: 1000}")
    if "num_classes" in args:
        raise ConfigError("Model.model: set FleetX's base_classifier.num_classes or ppmoco's num_classes, not both")
    _chain("base_classifier.num_features", classifier["num_features"], "the backbone's width",
           _backbone_width(args.get("base_encoder")))
    args["num_classes"] = classifier["num_classes"]
    return args


def _chain(key, value, what, expected):
    if value != expected:
        raise ConfigError(f"Model.model.{key}: {value} but {what} is {expected}; the layer sizes must "
                          f"chain, set it to {expected}")
