"""The evaluation protocols on images whose class a stub backbone can read off exactly.

Every image is one solid colour per class. `ColourOracle` maps an image to the one-hot code of its
colour, a perfect feature: kNN and the linear protocol must score 100%, and with the evaluation
labels replaced by random ones exactly the share of images whose random label happens to be right.
So a bank built from the wrong split, labels misaligned with their images, or samples counted twice
cannot pass. A second stub returns the mean colour, to check what the kNN memory bank is made of.
"""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from PIL import Image

from ppmoco.engine.env import RunEnv
from ppmoco.eval.evaluator import Evaluator
from ppmoco.eval.inference import predict_dataset
from ppmoco.metrics import numpy_topk_accuracy
from ppmoco.modules.base import Module

from cifar_archive import write_cifar10

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]  # class c is COLOURS[c]
PLAIN = [{"ResizeImage": {"size": 8}}, {"NormalizeImage": {"mean": [0, 0, 0], "std": [1, 1, 1]}},
         {"ToCHWImage": None}]
# Training views that change every colour: a bank built with them would not hold the true colours.
JITTER = [{"ColorJitter": {"brightness": 0.8, "p": 1.0}}, *PLAIN]
ENV = RunEnv(device="cpu", world_size=1, rank=0, local_size=1, num_threads=1)


def colour_code(images):
    """One-hot of the 3-bit code (R > 0.5, G > 0.5, B > 0.5) of each image's mean colour."""
    bits = (images.mean(axis=[2, 3]) > 0.5).astype("int64")
    return F.one_hot(bits[:, 0] + 2 * bits[:, 1] + 4 * bits[:, 2], 8)


class ColourOracle(Module):
    """Features and logits that are the image's colour code (classes 0..3 have codes 1, 2, 4, 7)."""

    def extract_features(self, images):
        return colour_code(images)

    def extract_stages(self, images):
        return [colour_code(images).astype("float32").reshape([-1, 8, 1, 1])] * 5

    def validation_step(self, batch):
        return {"logits": paddle.gather(colour_code(batch[0]), paddle.to_tensor([1, 2, 4, 7]), axis=1),
                "labels": batch[-1]}

    def validation_end(self, outputs):
        return numpy_topk_accuracy(outputs["logits"], outputs["labels"], ks=(1,))


class MeanColour(ColourOracle):
    def extract_features(self, images):
        return images.mean(axis=[2, 3])


def solid_images(root, per_class, start=0):
    """root/<class>/<i>.png, one colour per class; returns [(relative path, class)] in listing order."""
    listed = []
    for label, colour in enumerate(COLOURS):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            Image.new("RGB", (12, 10), colour).save(root / f"c{label}" / f"{i:02d}.png")
            listed.append((f"c{label}/{i:02d}.png", label))
    return listed


def config(protocol, train, evaluation):
    loader = {"num_workers": 0, "use_shared_memory": False}
    sampler = {"batch_size": 7, "shuffle": False, "drop_last": False}  # 7: batches end mid-class
    # eager: these test the protocols; the fast path has its own tests (test_static_inference.py)
    return {"Global": {"seed": 0}, "Engine": {"execution": "eager", "mix_precision": {"enable": False}},
            "Eval": {"protocol": protocol, "precision": "float32",
                     "knn": {"ks": [1, 5, 20], "temperature": 0.07, "chunk_size": 3},
                     "svm": {"costs": [1.0, 10.0, 100.0], "cv_folds": 3, "layers": ["feat5", "gap"], "cache_dir": None},
                     "lowshot": {"ks": [1, 2, 8], "samples": 2, "seed": 0}},
            "Data": {"Train": {"dataset": train, "sampler": sampler, "loader": loader},
                     "Eval": {"dataset": evaluation, "sampler": sampler, "loader": loader}}}


@pytest.fixture
def folders(tmp_path):
    train = solid_images(tmp_path / "train", per_class=6)
    evaluation = solid_images(tmp_path / "val", per_class=5, start=50)
    return tmp_path, train, evaluation


def datasets(tmp_path, eval_labels=None):
    """Train: a contrastive dataset of the class folders with jittered views; Eval: the val folder,
    or a list file giving each image `eval_labels` instead of its class."""
    train = {"name": "ContrastiveLearningDataset", "root": str(tmp_path / "train"), "transform_ops": JITTER}
    if eval_labels is None:
        evaluation = {"name": "GeneralClsDataset", "root": str(tmp_path / "val"), "transform_ops": PLAIN}
    else:
        lines = "".join(f"{path} {label}\n" for path, label in eval_labels)
        (tmp_path / "shuffled_labels.txt").write_text(lines)
        evaluation = {"name": "GeneralClsDataset", "image_root": str(tmp_path / "val"), "class_num": 4,
                      "cls_label_path": str(tmp_path / "shuffled_labels.txt"), "transform_ops": PLAIN}
    return train, evaluation


def random_labels(evaluation):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=len(evaluation))
    share = 100.0 * float(np.mean(labels == np.array([c for _, c in evaluation])))
    assert 0 < share < 60  # the draw must differ from the truth for the check to mean anything
    return [(path, int(label)) for (path, _), label in zip(evaluation, labels)], share


# Catches (each shown by mutation): labels misaligned with their images by one row, a kNN bank
# from the evaluation split (its random labels then vote), and a batch counted twice (7-image
# batches end mid-class). For the SVMs also: decision values taken from the wrong class's SVM.
@pytest.mark.parametrize("protocol", ["knn", "linear", "svm", "lowshot_svm"])
def test_perfect_features_score_100_and_random_labels_score_their_share(folders, protocol):
    tmp_path, _, evaluation = folders
    results = Evaluator(config(protocol, *datasets(tmp_path)), ColourOracle(), ENV)()[protocol]
    scores = [v for name, v in results.items() if name.endswith(("top1", "top1_mean", "mAP", "mAP_mean"))]
    assert scores and all(v == 100.0 for v in scores), results

    shuffled, share = random_labels(evaluation)
    results = Evaluator(config(protocol, *datasets(tmp_path, shuffled)), ColourOracle(), ENV)()[protocol]
    scores = [v for name, v in results.items() if name.endswith(("top1", "top1_mean"))]
    assert scores and all(v == pytest.approx(share) for v in scores), (results, share)


# Catches (each shown by mutation): a memory bank built from the evaluation split, with the training
# views' augmentation (the jitter changes every colour), or with labels out of step with images.
def test_the_knn_bank_is_the_training_split_under_the_evaluation_transforms(folders):
    tmp_path, train, _ = folders
    evaluator = Evaluator(config("knn", *datasets(tmp_path)), MeanColour(), ENV)
    module = MeanColour()
    bank = predict_dataset(lambda batch: {"features": module.extract_features(batch[0]), "labels": batch[-1]},
                           *evaluator.bank_data)
    want = np.array([COLOURS[label] for _, label in train], dtype=np.float32) / 255.0
    np.testing.assert_allclose(bank["features"], want, atol=1e-6)
    np.testing.assert_array_equal(bank["labels"], [label for _, label in train])


# Catches: the bank of a CIFAR-10 pretraining run built as an image-folder dataset (GeneralClsDataset
# cannot read the archive), from the test split, or with the training views.
def test_the_knn_bank_of_cifar10_pretraining_is_its_training_split_under_the_evaluation_transforms(tmp_path):
    archive = str(tmp_path / "cifar-10-python.tar.gz")
    train_labels, test_labels = [c for c in range(4) for _ in range(3)], [3, 2, 1, 0, 0]
    write_cifar10(archive, train_labels, test_labels, colours=COLOURS)
    train = {"name": "Cifar10ContrastiveDataset", "data_file": archive, "transform_ops": JITTER}
    evaluation = {"name": "Cifar10ClsDataset", "data_file": archive, "mode": "test", "transform_ops": PLAIN}
    results = Evaluator(config("knn", train, evaluation), ColourOracle(), ENV)()["knn"]
    assert all(v == 100.0 for name, v in results.items() if name.endswith("top1")), results
    evaluator = Evaluator(config("knn", train, evaluation), MeanColour(), ENV)
    module = MeanColour()
    bank = predict_dataset(lambda batch: {"features": module.extract_features(batch[0]), "labels": batch[-1]},
                           *evaluator.bank_data)
    np.testing.assert_allclose(bank["features"], np.array([COLOURS[c] for c in train_labels]) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(bank["labels"], train_labels)
