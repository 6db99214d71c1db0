"""The VOC07 reader on generated VOCdevkit trees, and the SVM benchmarks on one through tools/eval.py."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

from ppmoco.data import build_dataset
from ppmoco.errors import ConfigError, DataError
from ppmoco.eval.evaluator import Evaluator
from ppmoco.models import build_backbone

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "eval"))
from test_protocols_with_oracles import ENV, ColourOracle, config  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "car": (0, 0, 255)}
PLAIN = [{"ResizeImage": {"size": 8}}, {"NormalizeImage": {"mean": [0, 0, 0], "std": [1, 1, 1]}},
         {"ToCHWImage": None}]


def make_voc(root, splits):
    """VOCdevkit/VOC2007 under `root` from {split: {image id: {class: VOC label}}}; each image is the
    colour of the first class it has with label 1 (grey without one)."""
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for split, images in splits.items():
        for name in COLOURS:
            lines = [f"{image_id} {labels[name]:2d}" for image_id, labels in images.items() if name in labels]
            (voc / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")
        for image_id, labels in images.items():
            colour = next((COLOURS[c] for c, label in labels.items() if label == 1), (128, 128, 128))
            Image.new("RGB", (12, 10), colour).save(voc / "JPEGImages" / f"{image_id}.jpg")
    return voc


def single_object(ids, start=0, difficult=()):
    """{id: labels}: image i shows class i % 3 (1), the others absent (-1); ids in `difficult` also
    hold a difficult next class (0)."""
    names = list(COLOURS)
    out = {}
    for i in range(start, start + ids):
        labels = {name: -1 for name in names}
        labels[names[i % 3]] = 1
        if i in difficult:
            labels[names[(i + 1) % 3]] = 0
        out[f"{i:06d}"] = labels
    return out


def voc_dataset(voc, split, **kwargs):
    return build_dataset(dict(name="VOC07Dataset", root=str(voc), split=split, transform_ops=PLAIN, **kwargs),
                         "Data.Eval.dataset", 0)


def test_reads_the_voc_layout_into_present_absent_ignored_targets(tmp_path):
    # Catches VOC's -1 (absent) kept as -1 (would be ignored), 0 (difficult) taken as absent, classes
    # in file order instead of sorted, targets misaligned with images, and an image a class file does
    # not list taken as absent instead of ignored.
    images = {"000005": {"cat": 1, "dog": -1, "car": 0}, "000001": {"cat": -1, "dog": 1}}
    voc = make_voc(tmp_path, {"trainval": images})
    dataset = voc_dataset(voc, "trainval")
    assert dataset.class_names == ["car", "cat", "dog"] and dataset.num_classes == 3 and dataset.multi_label
    assert [os.path.basename(p) for p, _ in dataset.samples] == ["000001.jpg", "000005.jpg"]
    assert dataset.labels.tolist() == [[-1, 0, 1], [-1, 1, 0]]
    image, target = dataset[1]
    assert image.shape == (3, 8, 8) and target.dtype == np.int64 and target.tolist() == [-1, 1, 0]
    assert np.allclose(image[:, 4, 4], [1, 0, 0], atol=0.05)  # image 000005 is the red cat


@pytest.mark.parametrize("mutate, message", [
    (lambda main: (main / "dog_test.txt").unlink(),
     r"ImageSets/Main: dog_test.txt is missing \(class dog has files for other splits\)"),
    (lambda main: (main / "cat_test.txt").write_text("000100  2\n"),
     r"cat_test.txt line 1: expected '<image id> <1, -1 or 0>', got '000100  2'"),
    (lambda main: (main / "cat_test.txt").write_text("000100\n"),
     r"cat_test.txt line 1: expected '<image id> <1, -1 or 0>', got '000100'"),
    (lambda main: [(main / f"{c}_test.txt").unlink() for c in COLOURS],
     r"no <class>_test.txt files \(splits found: trainval\); set split to one of them"),
    (lambda main: (main.parent.parent / "JPEGImages" / "000100.jpg").unlink(),
     r"JPEGImages/000100.jpg does not exist \(listed in .*/\*_test.txt\); restore JPEGImages"),
])
def test_a_broken_voc_folder_is_one_line_naming_the_file(tmp_path, mutate, message):
    # Catches a missing split file read as a class with no images, a label outside 1/-1/0 taken as a
    # class index, and missing images found only when a loader worker decodes them.
    voc = make_voc(tmp_path, {"trainval": single_object(6), "test": single_object(3, start=100)})
    mutate(voc / "ImageSets" / "Main")
    with pytest.raises(DataError, match=message) as err:
        voc_dataset(voc, "test")
    assert "\n" not in str(err.value)


def test_not_a_voc_folder_and_a_wrong_class_num_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"has no ImageSets/Main; root must be the VOC2007 folder of VOCdevkit"):
        voc_dataset(tmp_path, "test")
    voc = make_voc(tmp_path, {"test": single_object(3)})
    with pytest.raises(ConfigError, match=r"Data.Eval.dataset.class_num: 20, but .* has 3 classes \(car, cat, dog\)"):
        voc_dataset(voc, "test", class_num=20)


def run_eval(*overrides):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "eval.py"), "-c", "configs/benchmarks/svm_voc07.yaml"]
    for o in overrides:
        cmd += ["-o", o]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_svm_voc07_configs_score_the_voc_tree_through_tools_eval(tmp_path):
    # Catches the VOC dataset unusable from the shipped configs (a key the reader does not take, the
    # memory bank rebuilt as a single-label dataset), difficult images counted against the SVM, a
    # top-1 reported for multi-label data, and the low-shot config not reading svm's cached features.
    voc = make_voc(tmp_path, {"trainval": single_object(24, difficult={1, 2, 3}),
                              "test": single_object(12, start=100, difficult={100, 104})})
    backbone = {"name": "resnet18", "widths": [8, 16, 16, 16]}
    paddle.seed(0)
    paddle.save(build_backbone(backbone, "backbone").state_dict(), str(tmp_path / "backbone.pdparams"))
    small = [f"Data.{split}.dataset.root={voc}" for split in ("Train", "Eval")] + [
        "Model.model.base_encoder.name=resnet18", "Model.model.base_encoder.widths=[8,16,16,16]",
        f"Model.model.base_encoder.pretrained={tmp_path / 'backbone.pdparams'}",
        "Data.Eval.dataset.transform_ops.0.ResizeImage.resize_short=16",
        "Data.Eval.dataset.transform_ops.1.ResizeImage.size=16", "Data.Eval.loader.num_workers=0",
        "Eval.svm.layers=[feat5,gap]", "Eval.svm.costs=[0.1,1.0]", f"Engine.save_load.output_dir={tmp_path / 'out'}"]
    svm = run_eval(*small)
    assert svm.returncode == 0, svm.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())["results"]["svm"]
    assert results == {"feat5_mAP": 100.0, "gap_mAP": 100.0, "best_mAP": 100.0}
    low = run_eval(*small, "Eval.protocol=lowshot_svm", "Eval.lowshot.ks=[1,2]", "Eval.lowshot.samples=2")
    assert low.returncode == 0, low.stderr[-3000:]
    assert low.stdout.count("using cached features") == 2
    assert re.search(r"lowshot_svm feat5 k=2 mAP=\d+\.\d\d\+-\d+\.\d\d", low.stdout)
    # One row for the one checkpoint, SVM and low-shot side by side (best layer: feat5, the first of equals).
    table = (tmp_path / "out" / "eval_results.md").read_text()
    assert "| checkpoint | best layer | SVM | k=1 | k=2 |" in table
    assert re.search(rf"\n\| {re.escape(str(tmp_path / 'backbone.pdparams'))} \| feat5 \| 100.00 \| \d+\.\d\d \| "
                     r"\d+\.\d\d \|\n", table)


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_single_label_protocols_refuse_multi_label_data_in_one_line(tmp_path, protocol):
    # Catches VOC targets reaching kNN's voting or the classifier's cross-entropy as class indices.
    voc = make_voc(tmp_path, {"trainval": single_object(6), "test": single_object(3, start=100)})
    cfg = config(protocol, *({"name": "VOC07Dataset", "root": str(voc), "split": split, "transform_ops": PLAIN}
                             for split in ("trainval", "test")))
    with pytest.raises(ConfigError, match=re.escape(
            f"Eval.protocol: '{protocol}' needs single-label data, and Data.Eval.dataset (VOC07Dataset) is "
            "multi-label; use svm or lowshot_svm")):
        Evaluator(cfg, ColourOracle(), ENV)
