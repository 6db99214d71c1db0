"""Backbone features of a whole dataset, per layer (ppmoco/feature_layers.py), cached.

The maps come from the Module hook `extract_stages` and are pooled by ppmoco.models.pool_stages:
mmselfsup's windows at 224 px, adaptive pooling to the same grids at other sizes.

Features are extracted in exact dataset order (predict_dataset) and, given the file the weights came
from, cached as `.npz` keyed by that file's identity (path, size, modification time), the layers,
the dataset with its transforms, the version of the pooling (POOLING_VERSION) and, for features not
computed in float32, how they were (Eval.precision bfloat16, or the dtype of a module O2 mixed precision
cast: ppmoco/eval/precision.py): a second protocol on the same checkpoint reads them back. On the evaluation
fast path the stages are computed and pooled by a checked oneDNN predictor (static_inference.py).
"""
import hashlib
import io
import json
import logging
import os

import numpy as np
import paddle

from ppmoco.distributed import rank, world_size
from ppmoco.eval.inference import predict_dataset
from ppmoco.fileio import write_bytes_atomic
from ppmoco.models import pool_stages
from ppmoco.models.pooling import POOLING_VERSION
from ppmoco.models.pretrained import weights_file

logger = logging.getLogger("ppmoco")


def pool_layers(maps, layers):
    """{layer: [N, D] float32 tensor} from the stage maps of one batch (ppmoco.models.pool_stages, flattened)."""
    return {layer: pooled.flatten(1).astype("float32") for layer, pooled in pool_stages(maps, layers).items()}


def extract_layers(module, data, layers, name, inference=None, precision=None):
    """{layer: [N, D], "labels": [N]} numpy arrays of the dataset in `data` (eval_loader's triple); the
    stages run and are pooled on `inference` (a StaticInference in a session) when given, else eagerly;
    under `precision` (a precision.HookPrecision: the autocast of an O2-cast module) when given."""
    def pooled(batch):
        return pool_layers(module.extract_stages(batch[0]), layers)

    if precision is not None:
        pooled = precision.wrap(pooled)  # pooled in the stages' dtype, handed on as float32

    if inference is not None:
        # one predictor per set of layers: the memory bank and the evaluation set share it
        pooled = inference.wrap(f"extract_stages {'+'.join(layers)}", pooled)

    def step(batch):
        return dict(pooled(batch), labels=batch[-1])

    with paddle.no_grad():
        return predict_dataset(step, *data, name=name)


def weights_identity(path):
    """(path, size, mtime) of the file the weights at `path` are read from (a file, a `.pdparams`-less
    name or a checkpoint folder, as Model.model.base_encoder.pretrained): it changes whenever they can."""
    file = os.path.abspath(weights_file(path, "Model.model.base_encoder.pretrained", "check the path"))
    return file, os.path.getsize(file), os.stat(file).st_mtime_ns


def cache_path(cache_dir, weights, layers, dataset_cfg, precision="float32"):
    """The cache file of these weights' `layers` over the dataset `dataset_cfg` (source and transforms),
    computed in `precision` (Eval.precision)."""
    parts = [weights_identity(weights), sorted(layers), dataset_cfg, POOLING_VERSION]
    # float32 keys stay as they were before Eval.precision existed, so caches written then stay valid
    key = json.dumps(parts if precision == "float32" else [*parts, precision], sort_keys=True, default=str)
    return os.path.join(cache_dir, f"features-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz")


def save_features(path, arrays):
    """dataset_features' arrays as one `.npz`, written atomically (no half file for the next run)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out = io.BytesIO()
    np.savez(out, **arrays)
    write_bytes_atomic(path, out.getvalue())


def load_features(path):
    """save_features' arrays: {layer: [N, D], "labels": [N], "paths": [N]}."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def dataset_features(module, data, layers, name, cache_dir=None, weights=None, dataset_cfg=None, inference=None,
                     precision=None):
    """extract_layers' arrays plus "paths"; read from / written to `cache_dir` when the weights'
    file `weights` is known (weights changing in memory, as during training, are never cached).
    `precision` is extract_layers'."""
    computed_in = "float32" if inference is None else inference.precision
    if precision is not None and precision.autocast is not None:
        computed_in = f"{precision.dtype} O2"  # features of an O2-cast module are not the float32 ones
    path = None if cache_dir is None or weights is None else cache_path(cache_dir, weights, layers, dataset_cfg,
                                                                         computed_in)
    paths = np.asarray([p for p, _ in data[2].samples], dtype=str)
    cached = None
    if path is not None and os.path.isfile(path):
        cached = load_features(path)
        # The config names a folder or list, not its contents: images added or removed since make
        # the cache stale.
        if not np.array_equal(cached["paths"], paths):
            logger.info(f"{name}: the images changed since {path} was cached; extracting again")
            cached = None
    if path is not None and world_size() > 1:
        # Rank 0 writes the cache: on nodes that do not share cache_dir another rank has no copy, and
        # extraction is collective, so every rank uses the cache or none does.
        everyone = []
        paddle.distributed.all_gather_object(everyone, cached is not None)
        if cached is not None and not all(everyone):
            logger.info(f"{name}: rank(s) {[r for r, ok in enumerate(everyone) if not ok]} have no copy of {path} "
                        "(is the cache folder shared?); extracting again on every rank")
            cached = None
    if cached is not None:
        logger.info(f"{name}: using cached features {path}")
        return cached
    features = dict(extract_layers(module, data, layers, name, inference, precision), paths=paths)
    if path is not None:
        if rank() == 0:
            save_features(path, features)
            logger.info(f"{name}: cached features in {path}")
        if world_size() > 1:  # every rank must see the same cache on the next call, or they diverge
            paddle.distributed.barrier()
    return features
