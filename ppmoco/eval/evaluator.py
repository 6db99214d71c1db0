"""Evaluation protocols over `Data.Eval`: `linear` (the module's own classifier), `knn`, and the linear
SVM benchmarks `svm` and `lowshot_svm` (ppmoco/eval/svm.py, features from ppmoco/eval/features.py).

kNN follows mmselfsup: global-average-pooled backbone features of the training images (memory bank,
built with the evaluation transforms: no augmentation) vote for each evaluation image. The SVMs
train on the same memory bank.

A module whose layers O2 mixed precision cast to float16/bfloat16 (on GPU) has its hooks run under the
run's autocast and their outputs evaluated in float32 (ppmoco/eval/precision.py).
"""
import logging

from ppmoco.data import build_dataloader, build_dataset, labelled_form
from ppmoco.errors import ConfigError, DataError
from ppmoco.eval.features import dataset_features
from ppmoco.eval.inference import predict_dataset
from ppmoco.eval.knn import flatten_knn, format_knn, knn_classify, nest_knn
from ppmoco.eval.precision import HookPrecision
from ppmoco.eval.static_inference import StaticInference

logger = logging.getLogger("ppmoco")


# The optional Module hooks each protocol calls (see ppmoco/modules/base.py).
_HOOKS = {"linear": ("validation_step", "validation_end"), "knn": ("extract_features",),
          "svm": ("extract_stages",), "lowshot_svm": ("extract_stages",)}
_MULTI_LABEL = ("svm", "lowshot_svm")  # the protocols that score multi-label data (VOC): per-class mAP


def eval_loader(dataset, data_cfg, env, seed):
    """(loader, sampler, dataset) visiting `dataset` once in order, split over `env`'s ranks, with
    `data_cfg`'s (Data.Eval's) batch size and loader settings; for predict_dataset."""
    # Unshuffled and without drop_last: config.load_config rejects an Eval sampler asking otherwise.
    loader, sampler = build_dataloader(dataset, data_cfg["sampler"]["batch_size"], env.world_size, env.rank,
                                       False, False, seed, **data_cfg["loader"])
    return loader, sampler, dataset


def bank_dataset_cfg(train_cfg, eval_cfg):
    """The training images as a labelled, unaugmented dataset: Train's source, Eval's transforms."""
    augmentations = ("views", "transform_ops", "view_trans1", "view_trans2")
    cfg = {k: v for k, v in train_cfg.items() if k != "name" and k not in augmentations}
    return dict(cfg, name=labelled_form(train_cfg, "Data.Train.dataset"), transform_ops=eval_cfg.get("transform_ops"))


def inference_for(cfg, module, env):
    """The StaticInference of `module` that Engine.execution, Eval.precision and `env` ask for."""
    engine = cfg["Engine"]
    return StaticInference(module, engine["execution"], cfg["Eval"]["precision"], engine["mix_precision"], env)


class Evaluator:
    """Builds the evaluation data once; each call evaluates the module's current weights."""

    def __init__(self, cfg, module, env):
        self.module, self.protocol, self.knn_cfg = module, cfg["Eval"]["protocol"], cfg["Eval"]["knn"]
        self.svm_cfg, self.lowshot_cfg = cfg["Eval"]["svm"], cfg["Eval"]["lowshot"]
        # Engine.mix_precision: the autocast of a module its O2 cast left in float16/bfloat16 (precision.py)
        self.amp = cfg.get("Engine", {}).get("mix_precision")
        self.hook_precision = None  # the HookPrecision of the evaluation running
        self.announced_autocast = False
        self.weights = self.cache_dir = None  # see cache_features
        # (features, labels) of the evaluation images from the last call, where the protocol
        # computes features (kNN): for pictures of the embedding.
        self.embedding = None
        data, seed = cfg["Data"], cfg["Global"]["seed"]
        served = [protocol for protocol, hooks in _HOOKS.items() if all(module.supports(h) for h in hooks)]
        if self.protocol not in served:
            fix = f"use {' or '.join(served)}" if served else "it defines no evaluation hook (ppmoco/modules/base.py)"
            raise ConfigError(f"Eval.protocol: {type(module).__name__} does not support '{self.protocol}'; {fix}")
        # Forward passes on checked oneDNN predictors where the training fast path would run.
        self.inference = inference_for(cfg, module, env)
        eval_set = build_dataset(data["Eval"]["dataset"], "Data.Eval.dataset", seed)
        if eval_set.multi_label and self.protocol not in _MULTI_LABEL:
            raise ConfigError(f"Eval.protocol: '{self.protocol}' needs single-label data, and Data.Eval.dataset "
                              f"({data['Eval']['dataset']['name']}) is multi-label; use {' or '.join(_MULTI_LABEL)}")
        self.eval_data = eval_loader(eval_set, data["Eval"], env, seed)
        self.dataset_cfgs = {"eval": data["Eval"]["dataset"]}
        self.workers = env.num_threads  # threads for the SVMs: this process's share of the CPUs
        if self.protocol != "linear":
            self.dataset_cfgs["bank"] = bank_dataset_cfg(data["Train"]["dataset"], data["Eval"]["dataset"])
            try:
                bank = build_dataset(self.dataset_cfgs["bank"], "Data.Train.dataset", seed)
            except DataError as err:
                raise DataError(f"{err} (the {self.protocol} evaluation's memory bank is the labelled training "
                                "images, also for the online monitor of a pretraining run: give "
                                "Data.Train.dataset class folders or a labelled list, or set Engine.eval_freq=-1 "
                                "to pretrain without the monitor)") from None
            if bank.multi_label != eval_set.multi_label:
                raise ConfigError("Data.Train.dataset: the training images are "
                                  f"{'multi' if bank.multi_label else 'single'}-label but the evaluation images "
                                  "are not; give both splits the same kind of dataset")
            self.bank_data = eval_loader(bank, data["Eval"], env, seed)
            self.num_classes = max(bank.num_classes, eval_set.num_classes)
            self.class_names = bank.class_names if bank.num_classes == self.num_classes else None

    def cache_features(self, weights, cache_dir):
        """Cache the SVM protocols' features in `cache_dir`, keyed by the file `weights` the module's
        weights were loaded from. Only evaluation-only tools call this: training changes the weights
        in memory, which no file identity would notice."""
        self.weights, self.cache_dir = weights, cache_dir

    def __call__(self):
        """{protocol: {name: value}}: the configured protocol's results as one flat dict, percentages.

        E.g. {"linear": {"top1": 71.2, "top5": 90.1}} or {"knn": {"k20_top1": 97.1, "k20_top5": ...}}.
        Flat so the Engine can log every value and find `Module.monitor` without knowing protocols.
        """
        was_training = self.module.training
        self.module.eval()
        # Decided now, not when the Evaluator was built: the Engine's step casts the module after that.
        self.hook_precision = HookPrecision(self.module, self.amp)
        dtype = self.hook_precision.dtype
        if self.hook_precision.autocast is not None and not self.announced_autocast:
            logger.info(f"eval: the module's layers are {dtype} (O2 mixed precision): its hooks run under "
                        f"autocast O2 {dtype}, their outputs are evaluated in float32")
            self.announced_autocast = True
        try:
            run = {"linear": self._linear, "knn": self._knn, "svm": self._svm, "lowshot_svm": self._lowshot}
            with self.inference.session():
                return {self.protocol: run[self.protocol]()}
        finally:
            self.hook_precision = None
            if was_training:
                self.module.train()

    def _linear(self):
        """The module's own metrics over the exact evaluation set."""
        step = self.inference.wrap("validation_step", self.hook_precision.wrap(self.module.validation_step),
                                   reads_labels=True)
        out = predict_dataset(step, *self.eval_data, name="eval linear")
        return {k: float(v) for k, v in self.module.validation_end(out).items()}

    def _knn(self):
        """Weighted kNN of the evaluation images' features against the training images' features."""
        extract = self.inference.wrap("extract_features", self.hook_precision.wrap(
            lambda batch: {"features": self.module.extract_features(batch[0])}))

        def features(batch):
            return dict(extract(batch), labels=batch[-1])

        bank = predict_dataset(features, *self.bank_data, name="eval knn: training features")
        query = predict_dataset(features, *self.eval_data, name="eval knn: evaluation features")
        self.embedding = (query["features"], query["labels"])
        results = knn_classify(bank["features"], bank["labels"], query["features"], query["labels"],
                               self.num_classes, ks=tuple(self.knn_cfg["ks"]),
                               temperature=self.knn_cfg["temperature"],
                               chunk_size=self.knn_cfg["chunk_size"])
        return flatten_knn(results)

    def _svm_features(self):
        """The pooled layers of Eval.svm.layers for (memory bank, evaluation set), cached when possible."""
        options = dict(cache_dir=self.cache_dir, weights=self.weights, inference=self.inference,
                       precision=self.hook_precision)
        return [dataset_features(self.module, data, self.svm_cfg["layers"], f"eval {self.protocol}: {what} features",
                                 dataset_cfg=self.dataset_cfgs[split], **options)
                for split, data, what in (("bank", self.bank_data, "training"), ("eval", self.eval_data, "evaluation"))]

    def _svm(self):
        """Per layer, top-1 (single-label data) and mAP of cross-validated one-vs-rest SVMs; then those of
        the best layer (by mAP)."""
        # Imported by the SVM protocols only: ppmoco/eval/svm.py's scikit-learn takes ~1.7 s to import,
        # which every training process (the engine evaluates through this class) would pay.
        from ppmoco.eval.svm import svm_scores

        bank, query = self._svm_features()
        per_layer = {layer: svm_scores(bank[layer], bank["labels"], query[layer], query["labels"], self.num_classes,
                                       self.svm_cfg["costs"], self.svm_cfg["cv_folds"], self.workers, self.class_names,
                                       name=f"svm {layer}")
                     for layer in self.svm_cfg["layers"]}
        best = max(self.svm_cfg["layers"], key=lambda layer: per_layer[layer]["mAP"])  # first of equals
        logger.info(f"svm: the best layer is {best}")
        out = {f"{layer}_{metric}": value for layer, scores in per_layer.items() for metric, value in scores.items()}
        return dict(out, **{f"best_{metric}": value for metric, value in per_layer[best].items()})

    def _lowshot(self):
        """Per layer and k, mean and std of top-1 (single-label data) and mAP over the seeded low-shot draws."""
        from ppmoco.eval.svm import lowshot_scores  # (see _svm)

        bank, query = self._svm_features()
        low = self.lowshot_cfg
        return {f"{layer}_{name}": value for layer in self.svm_cfg["layers"]
                for name, value in lowshot_scores(bank[layer], bank["labels"], query[layer], query["labels"],
                                                  self.num_classes, self.svm_cfg["costs"], low["ks"],
                                                  low["samples"], low["seed"], self.workers, self.class_names,
                                                  name=f"lowshot_svm {layer}").items()}


# Protocols whose eval_results.json and log lines are not their plain flat results: kNN nests
# them by k, the form its file and log lines have always had.
_NESTED = {"knn": nest_knn}


def _svm_lines(protocol, values):
    """One line per layer, and per k for low-shot (mean+-std over the draws):
    `svm feat5 top1=94.72 mAP=96.16`, `lowshot_svm feat5 k=8 top1=80.10+-1.20 mAP=85.00+-0.90`."""
    where_size = 2 if protocol == "lowshot_svm" else 1  # (layer, k) or (layer,)
    groups = {}
    for name, value in values.items():
        parts = name.split("_")
        items = groups.setdefault(" ".join(parts[:where_size]).replace(" k", " k="), [])
        if parts[-1] == "std":  # follows its mean
            items[-1] += f"+-{value:.2f}"
        else:
            items.append(f"{parts[where_size]}={value:.2f}")
    return [f"{protocol} {where} {' '.join(items)}" for where, items in groups.items()]


def _lines(protocol, values):
    """A protocol's log lines: one per k for kNN, per layer (and k) for the SVMs, else its name and
    every value on one line."""
    if protocol == "knn":
        return format_knn(nest_knn(values))
    if protocol in ("svm", "lowshot_svm"):
        return _svm_lines(protocol, values)
    return [f"{protocol} " + " ".join(f"{k}={v:.2f}" for k, v in values.items())]


def report(results):
    """The Evaluator's results in eval_results.json's form: {"linear": {...}} or {"knn": {k: {...}}}."""
    return {protocol: _NESTED.get(protocol, dict)(values) for protocol, values in results.items()}


def summary_lines(results):
    """One line per result, e.g. `knn k=20 top1=97.11 top5=99.78` or `linear top1=71.20 top5=90.10`."""
    return [line for protocol, values in results.items() for line in _lines(protocol, values)]
