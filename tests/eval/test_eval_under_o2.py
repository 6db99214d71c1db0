"""Evaluating a module whose layers O2 mixed precision cast (ppmoco/eval/precision.py).

On GPU, `Engine.mix_precision: {enable: true, level: O2}` makes the training step's
`paddle.amp.decorate` cast the module's convolutions and linear layers to float16/bfloat16; an
evaluation hook run eagerly outside autocast then feeds float32 images to them and fails in the kernel.
On CPU `decorate` casts nothing and Paddle's autocast does nothing either (Paddle 3.3 warns "amp_guard
can only be enabled on CUDAPlace, XPUPlace, and CustomPlace" and computes as before; its CPU kernels
have no bfloat16 conv2d, batch_norm, pool2d or matmul). So these tests cast with
paddle_internals.o2_cast (the function decorate calls on GPU) and stand in for Paddle's autocast with
EmulatedO2: inside it the cast layers compute in float32 from exactly their bfloat16 values and every
layer's output is rounded to bfloat16, the precision a GPU's O2 autocast keeps between ops.

What only a GPU exercises: Paddle's own autocast running the cast layers (its op lists, the float32
normalisation layers fed float16/bfloat16 activations), float16, and the memory the evaluation takes.
"""
import numpy as np
import paddle
import pytest
from PIL import Image

from ppmoco.engine.env import RunEnv
from ppmoco.eval import evaluator as evaluator_module
from ppmoco.eval import precision, svm
from ppmoco.eval.evaluator import Evaluator
from ppmoco.eval.precision import HookPrecision, as_float32, cast_dtype
from ppmoco.modules.base import Module
from ppmoco.modules.linear_eval import LinearEval
from ppmoco.modules.mhead_linear import MultiHeadLinearEval
from ppmoco.modules.moco import MoCo
from ppmoco.paddle_internals import o2_cast

ENV = RunEnv(device="cpu", world_size=1, rank=0, local_size=1, num_threads=1)
ENCODER = {"name": "resnet18", "widths": [8, 16, 16, 32], "cifar_stem": True}
AMP = {"enable": True, "dtype": "bfloat16", "level": "O2", "scale_loss": 1.0,
       "custom_black_list": ["reduce_sum"], "custom_white_list": []}
SVM_SCORES, KNN_CLASSIFY = svm.svm_scores, evaluator_module.knn_classify
PLAIN = [{"NormalizeImage": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}, {"ToCHWImage": None}]
CLASSES = 4

# The largest difference between the bfloat16 (emulated O2) and the float32 module, relative to the
# largest float32 value, measured over the 52 images below with ResNet-18 at widths 8..32, seeds 0-4:
# kNN features 6.3e-3 to 1.4e-2, linear-probe logits 5.8e-3 to 1.2e-2, pooled feat5 SVM features up
# to 1.3e-2. bfloat16 keeps 8 bits of mantissa (each layer's output rounded by up to 2^-9 = 2e-3 of its
# value), so this bound is about twice the largest spread measured; a crossed-up evaluation (uint16 bits
# read as numbers, float32 weights used instead of the cast ones: spread 0) is far outside it.
FEATURE_BOUND = 3e-2
# Scores over the 32 evaluation images of random-initialised networks, whose features have near ties:
# bfloat16 moved kNN top-1 / top-5 and SVM top-1 by up to 2 images (6.25 points) and SVM mAP by up to
# 2.8 points over seeds 0-4 (none for the probes' top-k); 3 images are allowed.
SCORE_BOUND = 100.0 * 3 / 32


class EmulatedO2:
    """A CPU stand-in for `paddle.amp.auto_cast`: records how it is entered and, while open, computes the
    O2-cast layers of `module` as a GPU's O2 autocast would (weights the cast values, activations rounded
    to the cast dtype), in float32 since the CPU has no bfloat16 kernels."""

    def __init__(self, module):
        self.module, self.entered, self.open = module, [], False
        self.low = {}  # cast layer -> its dtype, while open

    def __call__(self, **kwargs):
        self.entered.append(kwargs)
        self.dtype = kwargs["dtype"]
        return self

    def __enter__(self):
        assert not self.open, "autocast entered twice"
        self.open = True
        for layer in self.module.sublayers(include_self=True):
            own = [p for p in layer.parameters(include_sublayers=False) if str(p.dtype).endswith(self.dtype)]
            if own:
                assert not layer.sublayers(), "O2 casts leaf layers"
                self.low[layer] = own[0].dtype
                layer.to(dtype="float32")  # exact: every bfloat16 value is a float32 value
        self.handles = [layer.register_forward_post_hook(self._round) for layer in self.module.sublayers()]
        return self

    def _round(self, layer, inputs, output):
        def rounded(x):
            if isinstance(x, paddle.Tensor) and x.dtype == paddle.float32:
                return x.astype(self.dtype).astype("float32")
            return x
        return [rounded(x) for x in output] if isinstance(output, (list, tuple)) else rounded(output)

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        for layer, dtype in self.low.items():
            layer.to(dtype=dtype)
        self.low, self.open = {}, False
        return False


def write_images(root, per_class, seed):
    """root/c<k>/<i>.png: noise around a colour per class, so features and scores are not trivial."""
    rng = np.random.default_rng(seed)
    tints = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200], [150, 150, 60]])
    for label in range(CLASSES):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(tints[label] + rng.normal(0, 60, size=(12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{label}" / f"{i}.png")


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("o2_images")
    write_images(root / "train", per_class=5, seed=1)
    write_images(root / "val", per_class=8, seed=2)
    return root


def config(protocol, root, amp):
    loader = {"num_workers": 0, "use_shared_memory": False}
    sampler = {"batch_size": 6, "shuffle": False, "drop_last": False}
    train = {"name": "ContrastiveLearningDataset", "root": str(root / "train"), "transform_ops": PLAIN}
    evaluation = {"name": "GeneralClsDataset", "root": str(root / "val"), "transform_ops": PLAIN}
    return {"Global": {"seed": 0}, "Engine": {"execution": "eager", "mix_precision": amp},
            "Eval": {"protocol": protocol, "precision": "float32",
                     "knn": {"ks": [1, 5, 20], "temperature": 0.07, "chunk_size": 8},
                     "svm": {"costs": [1.0, 10.0], "cv_folds": 2, "layers": ["feat5"], "cache_dir": None},
                     "lowshot": {"ks": [1], "samples": 1, "seed": 0}},
            "Data": {"Train": {"dataset": train, "sampler": sampler, "loader": loader},
                     "Eval": {"dataset": evaluation, "sampler": sampler, "loader": loader}}}


MODULES = {"moco": lambda: MoCo(base_encoder=ENCODER, projector={"hidden_dim": 16}, dim=8, K=12),
           "linear": lambda: LinearEval(base_encoder=ENCODER, num_classes=CLASSES),
           "mhead": lambda: MultiHeadLinearEval(base_encoder=ENCODER, num_classes=CLASSES, layers=["feat4", "feat5"])}


def evaluate(kind, protocol, root, monkeypatch, cast, seed=0):
    """(results, the outputs validation_end, kNN or the SVMs saw, the emulated autocast) of a fresh
    module; cast as the Engine casts it: after its Evaluator was built."""
    paddle.seed(seed)
    module = MODULES[kind]()
    emulated = EmulatedO2(module)
    monkeypatch.setattr(paddle.amp, "auto_cast", emulated)
    seen = {}

    def outside_autocast(name, fn):
        """`fn`, recording its first argument under `name`: kNN, SVMs and metrics compute in float32."""
        def spy(first, *args, **kwargs):
            assert not emulated.open, f"{name} ran under autocast"
            seen[name] = first
            return fn(first, *args, **kwargs)
        return spy

    if module.supports("validation_end"):
        end = module.validation_end

        def validation_end(outputs):
            assert not emulated.open, "validation_end ran under autocast"
            seen.update(outputs)  # logits and labels, or each head's label ranks
            return end(outputs)
        monkeypatch.setattr(module, "validation_end", validation_end)
    # kNN's and the SVMs' inputs: the bank's features (kNN) and the pooled feat5 stages of the evaluation images
    monkeypatch.setattr(evaluator_module, "knn_classify", outside_autocast("bank", KNN_CLASSIFY))
    monkeypatch.setattr(svm, "svm_scores", lambda bank, bank_labels, query, *args, **kwargs: outside_autocast(
        "stages", lambda q, *a, **k: SVM_SCORES(bank, bank_labels, q, *a, **k))(query, *args, **kwargs))
    evaluator = Evaluator(config(protocol, root, AMP), module, ENV)
    if cast:
        o2_cast(module.low_precision_layers(), "bfloat16")  # what decorate does on GPU, after the Evaluator
    results = evaluator()[protocol]
    if evaluator.embedding is not None:
        seen["features"] = evaluator.embedding[0]
    return results, seen, emulated


def relative_spread(low, high):
    return float(np.abs(low.astype(np.float64) - high).max() / np.abs(high).max())


# Catches (reproduced before the fix, which ran the hooks outside autocast: conv2d's "The type of data
# we are trying to retrieve (float32) does not match the type of data (bfloat16) ... Expected dtype() ==
# phi::CppTypeToDataType<T>::Type()" in all four cases): an O2-cast module evaluated without autocast;
# autocast entered with another level, dtype or op lists than the run's (mutation: level "O1"); autocast
# around kNN's, the SVMs' or the metrics' own float32 computation (mutation: the whole protocol run
# under it); whether to autocast decided when the Evaluator is built, before the Engine's step casts the
# module (mutation); outputs off by more than bfloat16 rounding (FEATURE_BOUND), or by none at all.
@pytest.mark.parametrize("kind, protocol", [("moco", "knn"), ("linear", "linear"), ("mhead", "linear"),
                                            ("moco", "svm")])
def test_an_o2_cast_module_evaluates_close_to_its_float32_self(kind, protocol, image_folders, monkeypatch):
    want, want_seen, plain = evaluate(kind, protocol, image_folders, monkeypatch, cast=False)
    assert plain.entered == [], "a float32 module evaluates outside autocast, as before"
    got, got_seen, emulated = evaluate(kind, protocol, image_folders, monkeypatch, cast=True)
    assert emulated.entered and all(kwargs == {"enable": True, "level": "O2", "dtype": "bfloat16",
                                               "custom_white_list": None, "custom_black_list": ["reduce_sum"]}
                                    for kwargs in emulated.entered)
    assert set(got) == set(want)
    for name in got:
        assert abs(got[name] - want[name]) <= SCORE_BOUND, (name, got[name], want[name])
    # kNN's features, the linear probe's logits, the SVMs' pooled stages; the multi-head probe's label ranks
    assert want_seen and (kind == "mhead" or any(value.dtype == np.float32 for value in want_seen.values()))
    for name, value in want_seen.items():
        assert got_seen[name].dtype == value.dtype, name  # float32 features and logits, int labels/ranks
        if value.dtype == np.float32:
            assert 0 < relative_spread(got_seen[name], value) <= FEATURE_BOUND, name


class Bfloat16Features(Module):
    """Features that come out in bfloat16, as an O2-cast backbone's do under autocast on GPU."""

    def __init__(self):
        super().__init__()
        self.scale = self.create_parameter([1], default_initializer=paddle.nn.initializer.Constant(1.0))
        o2_cast([self], "bfloat16")

    def extract_features(self, images):
        return images.mean(axis=[2, 3]).astype("bfloat16")


# Catches bfloat16 outputs handed to numpy (reproduced before the fix: predict_dataset's features were
# uint16, the raw bits, which kNN reads as numbers; mutation: as_float32 returning its input): the
# features must reach kNN as float32 holding the bfloat16 values.
def test_low_precision_hook_outputs_reach_knn_as_float32(image_folders, monkeypatch):
    module = Bfloat16Features()
    assert cast_dtype(module) == "bfloat16"
    monkeypatch.setattr(paddle.amp, "auto_cast", EmulatedO2(module))
    evaluator = Evaluator(config("knn", image_folders, AMP), module, ENV)
    results = evaluator()["knn"]
    features = evaluator.embedding[0]
    assert features.dtype == np.float32
    assert np.abs(features).max() <= 2  # mean colours normalised by PLAIN; uint16 bits would be ~16000
    assert not (features.view(np.uint32) & 0xFFFF).any(), "bfloat16 values, as float32"
    assert results["k1_top1"] > 100.0 / CLASSES  # mean colours tell the tints apart


def test_hook_precision_follows_the_cast_and_the_config():
    paddle.seed(0)
    module = MODULES["linear"]()
    assert cast_dtype(module) is None and HookPrecision(module, AMP).autocast is None
    fn = module.validation_step
    assert HookPrecision(module, AMP).wrap(fn) is fn  # a float32 module's hooks run as before
    o2_cast(module.low_precision_layers(), "bfloat16")
    assert HookPrecision(module, None).autocast == {"enable": True, "level": "O2", "dtype": "bfloat16"}
    with pytest.raises(RuntimeError, match="mix_precision.dtype is float16"):
        HookPrecision(module, dict(AMP, dtype="float16"))
    out = as_float32({"a": paddle.ones([2]).astype("bfloat16"), "b": [paddle.ones([1], dtype="int64")], "c": 3})
    assert out["a"].dtype == paddle.float32 and out["b"][0].dtype == paddle.int64 and out["c"] == 3
    assert precision.dtype_name(paddle.bfloat16) == "bfloat16"
