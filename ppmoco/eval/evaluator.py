"""Evaluation protocols over `Data.Eval`: `linear` (the module's own classifier) and `knn`.

kNN follows mmselfsup: global-average-pooled backbone features of the training images (memory bank,
built with the evaluation transforms: no augmentation) vote for each evaluation image.
"""
import logging

from ppmoco.data import build_dataloader, build_dataset
from ppmoco.errors import ConfigError
from ppmoco.eval.inference import predict_dataset
from ppmoco.eval.knn import flatten_knn, format_knn, knn_classify, nest_knn

logger = logging.getLogger("ppmoco")


# The optional Module hooks each protocol calls (see ppmoco/modules/base.py).
_HOOKS = {"linear": ("validation_step", "validation_end"), "knn": ("extract_features",)}


def eval_loader(dataset, data_cfg, env, seed):
    """(loader, sampler, dataset) visiting `dataset` once in order, split over `env`'s ranks, with
    `data_cfg`'s (Data.Eval's) batch size and loader settings; for predict_dataset."""
    # Unshuffled and without drop_last: config.load_config rejects an Eval sampler asking otherwise.
    loader, sampler = build_dataloader(dataset, data_cfg["sampler"]["batch_size"], env.world_size, env.rank,
                                       False, False, seed, **data_cfg["loader"])
    return loader, sampler, dataset


def _bank_dataset_cfg(train_cfg, eval_cfg):
    """The training images as a labelled, unaugmented dataset: Train's source, Eval's transforms."""
    cfg = {k: v for k, v in train_cfg.items() if k not in ("name", "views", "transform_ops")}
    return dict(cfg, name="GeneralClsDataset", transform_ops=eval_cfg.get("transform_ops"))


class Evaluator:
    """Builds the evaluation data once; each call evaluates the module's current weights."""

    def __init__(self, cfg, module, env):
        self.module, self.protocol, self.knn_cfg = module, cfg["Eval"]["protocol"], cfg["Eval"]["knn"]
        # (features, labels) of the evaluation images from the last call, where the protocol
        # computes features (kNN): for pictures of the embedding.
        self.embedding = None
        data, seed = cfg["Data"], cfg["Global"]["seed"]
        if not all(module.supports(hook) for hook in _HOOKS[self.protocol]):
            raise ConfigError(f"Eval.protocol: {type(module).__name__} does not support '{self.protocol}'"
                              f"; use {'knn' if self.protocol == 'linear' else 'linear'}")
        eval_set = build_dataset(data["Eval"]["dataset"], "Data.Eval.dataset", seed)
        self.eval_data = eval_loader(eval_set, data["Eval"], env, seed)
        if self.protocol == "knn":
            bank = build_dataset(_bank_dataset_cfg(data["Train"]["dataset"], data["Eval"]["dataset"]),
                                 "Data.Train.dataset", seed)
            self.bank_data = eval_loader(bank, data["Eval"], env, seed)
            self.num_classes = max(bank.num_classes, eval_set.num_classes)

    def __call__(self):
        """{protocol: {name: value}}: the configured protocol's results as one flat dict, percentages.

        E.g. {"linear": {"top1": 71.2, "top5": 90.1}} or {"knn": {"k20_top1": 97.1, "k20_top5": ...}}.
        Flat so the Engine can log every value and find `Module.monitor` without knowing protocols.
        """
        was_training = self.module.training
        self.module.eval()
        try:
            run = self._linear if self.protocol == "linear" else self._knn
            return {self.protocol: run()}
        finally:
            if was_training:
                self.module.train()

    def _linear(self):
        """The module's own metrics over the exact evaluation set."""
        out = predict_dataset(self.module.validation_step, *self.eval_data, name="eval linear")
        return {k: float(v) for k, v in self.module.validation_end(out).items()}

    def _knn(self):
        """Weighted kNN of the evaluation images' features against the training images' features."""
        def features(batch):
            return {"features": self.module.extract_features(batch[0]), "labels": batch[-1]}

        bank = predict_dataset(features, *self.bank_data, name="eval knn: training features")
        query = predict_dataset(features, *self.eval_data, name="eval knn: evaluation features")
        self.embedding = (query["features"], query["labels"])
        results = knn_classify(bank["features"], bank["labels"], query["features"], query["labels"],
                               self.num_classes, ks=tuple(self.knn_cfg["ks"]),
                               temperature=self.knn_cfg["temperature"],
                               chunk_size=self.knn_cfg["chunk_size"])
        return flatten_knn(results)


# Protocols whose eval_results.json and log lines are not their plain flat results: kNN nests
# them by k, the form its file and log lines have always had.
_NESTED = {"knn": nest_knn}


def _lines(protocol, values):
    """A protocol's log lines: one per k for kNN, else its name and every value on one line."""
    if protocol == "knn":
        return format_knn(nest_knn(values))
    return [f"{protocol} " + " ".join(f"{k}={v:.2f}" for k, v in values.items())]


def report(results):
    """The Evaluator's results in eval_results.json's form: {"linear": {...}} or {"knn": {k: {...}}}."""
    return {protocol: _NESTED.get(protocol, dict)(values) for protocol, values in results.items()}


def summary_lines(results):
    """One line per result, e.g. `knn k=20 top1=97.11 top5=99.78` or `linear top1=71.20 top5=90.10`."""
    return [line for protocol, values in results.items() for line in _lines(protocol, values)]
