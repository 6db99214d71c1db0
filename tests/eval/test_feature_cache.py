"""The SVM protocols' feature cache (ppmoco/eval/features.py): reused for the same weights file, not otherwise."""
import hashlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from test_protocols_with_oracles import ENV, ColourOracle, config, datasets, folders, solid_images  # noqa: F401

from ppmoco.errors import CheckpointError
from ppmoco.eval.evaluator import Evaluator
from ppmoco.eval.features import cache_path, dataset_features, weights_identity
from ppmoco.models.pooling import POOLING_VERSION


class Counting(ColourOracle):
    calls = 0

    def extract_stages(self, images):
        Counting.calls += 1
        return super().extract_stages(images)


def run(tmp_path, protocol, weights):
    Counting.calls = 0
    evaluator = Evaluator(config(protocol, *datasets(tmp_path)), Counting(), ENV)
    evaluator.cache_features(str(weights), str(tmp_path / "cache"))
    return evaluator()[protocol], Counting.calls


def test_a_second_protocol_reads_the_cache_and_a_changed_checkpoint_extracts_again(folders, caplog):  # noqa: F811
    # Catches a cache that is never read (the backbone runs again), one keyed without the weights
    # file's identity (a retrained checkpoint would reuse stale features), and cached results that
    # differ from fresh ones.
    tmp_path = folders[0]
    weights = tmp_path / "model.pdparams"
    weights.write_bytes(b"first")
    fresh, calls = run(tmp_path, "svm", weights)
    assert calls > 0
    with caplog.at_level(logging.INFO, logger="ppmoco"):
        cached, calls = run(tmp_path, "svm", weights)
    assert calls == 0 and cached == fresh
    assert sum("using cached features" in r.getMessage() for r in caplog.records) == 2  # bank and eval
    _, calls = run(tmp_path, "lowshot_svm", weights)
    assert calls == 0

    weights.write_bytes(b"retrained")
    _, calls = run(tmp_path, "svm", weights)
    assert calls > 0


def test_training_weights_are_never_cached(folders):  # noqa: F811
    # Catches caching without a weights file: during training the same module's weights change in memory.
    tmp_path = folders[0]
    for _ in range(2):
        Counting.calls = 0
        Evaluator(config("svm", *datasets(tmp_path)), Counting(), ENV)()
        assert Counting.calls > 0
    assert not os.path.exists(tmp_path / "cache")


def test_the_cache_file_holds_layers_labels_and_paths_in_dataset_order(folders):  # noqa: F811
    # Catches paths or labels out of step with the features, and a key that ignores the layers.
    tmp_path, _, evaluation = folders
    weights = tmp_path / "w.pdparams"
    weights.write_bytes(b"w")
    evaluator = Evaluator(config("svm", *datasets(tmp_path)), ColourOracle(), ENV)
    cfg = evaluator.dataset_cfgs["eval"]
    out = dataset_features(ColourOracle(), evaluator.eval_data, ["gap"], "test", str(tmp_path), str(weights), cfg)
    with np.load(cache_path(str(tmp_path), str(weights), ["gap"], cfg)) as saved:
        assert sorted(saved.files) == ["gap", "labels", "paths"]
        np.testing.assert_array_equal(saved["gap"], out["gap"])
        assert [os.path.relpath(p, tmp_path / "val") for p in saved["paths"]] == [p for p, _ in evaluation]
        np.testing.assert_array_equal(saved["labels"], [label for _, label in evaluation])
    assert cache_path(str(tmp_path), str(weights), ["feat5"], cfg) != cache_path(str(tmp_path), str(weights),
                                                                                 ["gap"], cfg)


def test_bfloat16_features_have_their_own_cache_and_float32_keys_are_unchanged(tmp_path):
    # Catches features extracted in bfloat16 (Eval.precision) read back by a float32 run, and a float32
    # key changed by the precision entry (every cache written before it would be extracted again).
    weights = tmp_path / "w.pdparams"
    weights.write_bytes(b"w")
    cfg = {"name": "GeneralClsDataset", "root": "val"}
    float32 = cache_path(str(tmp_path), str(weights), ["gap"], cfg)
    assert cache_path(str(tmp_path), str(weights), ["gap"], cfg, "bfloat16") != float32
    before = json.dumps([weights_identity(str(weights)), ["gap"], cfg, POOLING_VERSION], sort_keys=True, default=str)
    assert os.path.basename(float32) == f"features-{hashlib.sha256(before.encode()).hexdigest()[:20]}.npz"


def test_missing_weights_are_one_line(tmp_path):
    # Catches a missing checkpoint surfacing as os.stat's FileNotFoundError traceback.
    with pytest.raises(CheckpointError, match=r"pretrained: no weights at .*nowhere or .*nowhere.pdparams; check"):
        weights_identity(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_two_processes_extract_in_dataset_order_and_both_read_the_cache_back(tmp_path):
    # Catches features in rank-interleaved order or with the sampler's padding duplicate, a cache
    # written by both ranks at once, and ranks that disagree on whether the cache exists (a hang
    # or a second extraction on one of them).
    from dist_features_worker import LABELS, ROWS

    worker = os.path.join(os.path.dirname(__file__), "dist_features_worker.py")
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "logs"), worker, str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    want = ROWS.reshape(7, 3)
    for rank in (0, 1):
        first, second, unshared = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert first["calls"] > 0 and second["calls"] == 0
        # Catches ranks deciding alone where the cache folder is not shared (rank 0 reading its copy
        # while rank 1 extracts: a hang in the extraction's collectives): both extract again.
        assert unshared["calls"] > 0
        for run in (first, second, unshared):
            np.testing.assert_array_equal(np.array(run["gap"], dtype="float32"), want)
            np.testing.assert_array_equal(np.array(run["feat5"], dtype="float32"), np.repeat(want, 4, axis=1))
            assert run["labels"] == LABELS.tolist() and run["paths"] == [f"img{i}.png" for i in range(7)]
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_images_added_since_caching_are_extracted_again(folders):  # noqa: F811
    # Catches a cache keyed only by the config, which names the folder and not the images in it.
    tmp_path = folders[0]
    weights = tmp_path / "model.pdparams"
    weights.write_bytes(b"w")
    run(tmp_path, "svm", weights)
    solid_images(tmp_path / "val", per_class=1, start=90)
    results, calls = run(tmp_path, "svm", weights)
    assert calls > 0 and results["feat5_top1"] == 100.0
