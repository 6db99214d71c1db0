"""The evaluation fast path (ppmoco/eval/static_inference.py): oneDNN predictors of the evaluation hooks.

Every comparison bounds max |static - eager| by 1e-5 x max(1, max |eager|): relative to the largest
output where outputs exceed 1 (ResNet-50 features of random weights reach ~800), absolute below. Each
value is also checked against an independent computation of one layer (PyTorch for the stem's pooled
feature1, NumPy for the linear classifier), so a static result that eager shares by accident (a
module bug) or that the check passes by accident cannot hide.
"""
import logging

import numpy as np
import paddle
import pytest
import test_protocols_with_oracles as oracles
from test_protocols_with_oracles import folders  # noqa: F401 - a fixture

from ppmoco import fast_path
from ppmoco.engine.env import RunEnv
from ppmoco.errors import ConfigError
from ppmoco.eval import static_inference
from ppmoco.eval.evaluator import Evaluator
from ppmoco.eval.features import pool_layers
from ppmoco.eval.static_inference import StaticInference
from ppmoco.modules.linear_eval import LinearEval
from ppmoco.modules.mhead_linear import MultiHeadLinearEval

from optional_deps import bfloat16_units_or_skip, torch_or_skip

ENV = RunEnv(device="cpu", world_size=1, rank=0, local_size=1, num_threads=2)
OFF = {"enable": False}  # Engine.mix_precision
FEATURES = ["feat1", "feat2", "feat3", "feat4", "feat5"]
BOUND = 1e-5


def probe(arch, seed=0, module=LinearEval, **kwargs):
    """A frozen-backbone probe in eval mode whose BatchNorms hold running statistics far from (0, 1)
    and whose classifier has a bias, so folding them wrongly or using batch statistics shows."""
    paddle.seed(seed)
    net = module({"name": arch}, 10, **kwargs)
    rng = np.random.default_rng(seed)
    for key, tensor in net.state_dict().items():
        if key.endswith("_mean") or key.endswith("bias"):
            paddle.assign(rng.normal(0, 0.2, tensor.shape).astype("float32"), tensor)
        elif key.endswith("_variance"):
            paddle.assign(rng.uniform(0.5, 2.0, tensor.shape).astype("float32"), tensor)
    return net.eval()


def batch(size=2, px=224, seed=1):
    rng = np.random.default_rng(seed)
    return [paddle.to_tensor(rng.standard_normal((size, 3, px, px)).astype("float32")),
            paddle.to_tensor(rng.integers(0, 10, size).astype("int64"))]


def assert_close(got, want, bound=BOUND):
    got, want = np.asarray(got, dtype="float64"), np.asarray(want, dtype="float64")
    assert got.shape == want.shape
    error = np.abs(got - want).max()
    assert error <= bound * max(1.0, np.abs(want).max()), (error, np.abs(want).max())


def eager(fn, images):
    with paddle.no_grad():
        return {k: v.numpy() for k, v in fn(images).items()}


def run_static(module, hooks, images, precision="float32", inference=None, checked=True):
    """{hook: {output: array}} from one session of `inference` or a new StaticInference, and the
    StaticInference; hooks named validation_step read the labels. `checked`: every predictor must
    have passed its check (none fell back to eager)."""
    inference = inference or StaticInference(module, "auto", precision, OFF, ENV)
    with inference.session():
        got = {name: {k: v.numpy() for k, v in inference.wrap(name, fn, name == "validation_step")(images).items()}
               for name, fn in hooks.items()}
    assert not checked or not inference.failed, inference.failed
    return got, inference


def torch_feature1(net, images):
    """feature1 computed by PyTorch from the Paddle weights: conv1, eval-mode BN, ReLU, then mmselfsup's
    10x10/10 average with padding 4 counted in (the stem map is 112 px at 224)."""
    torch = torch_or_skip()
    TF = torch.nn.functional
    state = {k: torch.from_numpy(v.numpy()) for k, v in net.backbone.state_dict().items()}
    x = TF.conv2d(torch.from_numpy(images[0].numpy()), state["conv1.weight"], stride=2, padding=3)
    x = TF.batch_norm(x, state["bn1._mean"], state["bn1._variance"], state["bn1.weight"], state["bn1.bias"],
                      training=False, eps=1e-5)
    return TF.avg_pool2d(TF.relu(x), 10, stride=10, padding=4, count_include_pad=True).flatten(1).numpy()


@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
def test_features_and_logits_equal_eager_and_an_independent_classifier(arch):
    # Catches (each shown by mutation): outputs handed back under each other's names, and a predictor
    # on stale weights (the second session, after the classifier changed, must give the new logits: a
    # predictor kept across sessions gives the old ones). The NumPy classifier also catches a wrong
    # classifier that eager would share. (BatchNorm in training mode cannot happen here: Paddle
    # Inference sets every is_test, measured by tracing a module in train mode.)
    net, images = probe(arch), batch()
    hooks = {"extract_features": lambda b: {"features": net.extract_features(b[0])},
             "validation_step": net.validation_step}
    got, inference = run_static(net, hooks, images)
    assert_close(got["extract_features"]["features"], eager(hooks["extract_features"], images)["features"])
    want = eager(net.validation_step, images)
    assert_close(got["validation_step"]["logits"], want["logits"])
    np.testing.assert_array_equal(got["validation_step"]["labels"], images[1].numpy())
    fc = net.classifier.fc
    assert_close(got["validation_step"]["logits"],
                 got["extract_features"]["features"] @ fc.weight.numpy() + fc.bias.numpy())

    paddle.assign(fc.weight * -2.0, fc.weight)
    again, _ = run_static(net, hooks, images, inference=inference)  # the next evaluation of a training run
    assert_close(again["validation_step"]["logits"], eager(net.validation_step, images)["logits"])
    assert np.abs(again["validation_step"]["logits"] - got["validation_step"]["logits"]).max() > 1e-2


@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
def test_pooled_stages_feature1_to_5_equal_eager_and_pytorch(arch):
    # The PyTorch stem and pooling catch what eager would share: a stem map taken after the max-pool,
    # mmselfsup's windows replaced by adaptive pooling, the padding left out of the average; the
    # comparison with eager catches pooled layers returned under each other's names.
    net, images = probe(arch), batch()
    hooks = {"stages": lambda b: pool_layers(net.extract_stages(b[0]), FEATURES)}
    got, _ = run_static(net, hooks, images)
    want = eager(hooks["stages"], images)
    for layer in FEATURES:
        assert_close(got["stages"][layer], want[layer])
    assert_close(got["stages"]["feat1"], torch_feature1(net, images))


def test_the_multi_head_probe_runs_and_its_batchnorms_are_left_without_affine_parameters():
    # The heads' BatchNorms have no scale or shift, and oneDNN's inference batch_norm dies of a
    # segmentation fault without one (the process itself, here the test run). Catches dropping the
    # unit scale given while tracing, and a trace that leaves it on the module (its state dict and
    # checkpoints would gain weight/bias tensors).
    net, images = probe("resnet18", module=MultiHeadLinearEval), batch(size=3)
    keys = list(net.state_dict())
    got, _ = run_static(net, {"logits": lambda b: net._logits(b[0]), "validation_step": net.validation_step}, images)
    want = eager(lambda b: net._logits(b[0]), images)
    for layer in FEATURES:
        assert_close(got["logits"][layer], want[layer])
    ranks = eager(net.validation_step, images)
    for layer in FEATURES:
        np.testing.assert_array_equal(got["validation_step"][layer], ranks[layer])
    assert list(net.state_dict()) == keys and net.heads["feat1"].norm.weight is None


class Wrong:
    """Stands in for a predictor whose outputs are a little off (a wrong oneDNN program)."""

    def __init__(self, real):
        self.real = real

    def __call__(self, batch):
        return {k: v + 1e-3 * max(1.0, float(v.abs().max())) for k, v in self.real(batch).items()}


def test_a_predictor_that_disagrees_is_dropped_and_the_hook_runs_eagerly(monkeypatch, caplog):
    # Catches a check that is skipped or too loose (the wrong outputs would be returned), a fallback
    # that returns the wrong outputs for the checked batch, one that retries the predictor on later
    # batches or sessions.
    net = probe("resnet18", module=LinearEval)
    build = StaticInference._build
    built = []

    def wrong_build(self, fn, batch, names, reads_labels):
        built.append(names)
        return Wrong(build(self, fn, batch, names, reads_labels))

    monkeypatch.setattr(StaticInference, "_build", wrong_build)
    small, large = batch(size=2, px=32), batch(size=3, px=32)
    caplog.set_level(logging.INFO, logger="ppmoco")
    inference = StaticInference(net, "auto", "float32", OFF, ENV)
    step = inference.wrap("validation_step", net.validation_step, reads_labels=True)
    with inference.session():
        outputs = [step(small), step(large)]
    with inference.session():
        outputs.append(step(small))
    for out, images in zip(outputs, (small, large, small)):
        np.testing.assert_array_equal(out["logits"].numpy(), eager(net.validation_step, images)["logits"])
    assert len(built) == 1  # the first session's; never again after the warning
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.getMessage().startswith("static evaluation")]
    assert len(warnings) == 1 and warnings[0].startswith("static evaluation not used for validation_step: logits is")


def test_each_image_size_gets_its_own_checked_predictor_and_batch_sizes_share_one():
    # Catches a second image size fed to the first size's predictor (a failure that would send the
    # hook eager for the rest of the run), and a predictor rebuilt for every batch size.
    net = probe("resnet18")
    inference = StaticInference(net, "auto", "float32", OFF, ENV)
    hook = {"extract_features": lambda b: {"f": net.extract_features(b[0])}}
    with inference.session():
        step = inference.wrap("extract_features", hook["extract_features"])
        for images in (batch(2, px=32), batch(3, px=32), batch(2, px=40)):
            assert_close(step(images)["f"].numpy(), eager(hook["extract_features"], images)["f"])
        predictors = inference.paths["extract_features"].checked  # batch shape -> its checked predictor
        assert len(predictors) == 3 and len(set(predictors.values())) == 2
    assert not inference.failed


def test_a_hook_wrapped_anew_for_the_next_evaluation_runs_its_new_function():
    # The Evaluator wraps its hooks anew each evaluation (their autocast may change). Catches the
    # predictors of a later session traced from the function of the first wrap.
    net, images = probe("resnet18"), batch(size=2, px=32)
    inference = StaticInference(net, "auto", "float32", OFF, ENV)
    for scale in (1.0, -2.0):
        hooks = {"extract_features": lambda b, scale=scale: {"f": scale * net.extract_features(b[0])}}
        got, _ = run_static(net, hooks, images, inference=inference)
        assert_close(got["extract_features"]["f"], eager(hooks["extract_features"], images)["f"])


def test_a_predictor_that_fails_natively_is_dropped(monkeypatch, caplog):
    # Catches a native failure (here: the predictor cannot be built) escaping as a crash of the
    # evaluation instead of the eager fallback with its reason.
    net, images = probe("resnet18"), batch(size=2, px=32)

    def broken(*args):
        raise RuntimeError("(PreconditionNotMet) oneDNN says no")

    monkeypatch.setattr(static_inference, "cpu_predictor", broken)
    got, inference = run_static(net, {"extract_features": lambda b: {"f": net.extract_features(b[0])}}, images,
                                checked=False)
    np.testing.assert_array_equal(got["extract_features"]["f"], eager(lambda b: {"f": net.extract_features(b[0])},
                                                                      images)["f"])
    assert inference.failed == {"extract_features": "the predictor failed (RuntimeError: (PreconditionNotMet) "
                                                    "oneDNN says no)"}


def test_where_the_fast_path_cannot_run_nothing_is_wrapped():
    # Catches the fast path taken in several processes or under Engine.execution: eager.
    net = probe("resnet18")
    two = RunEnv(device="cpu", world_size=2, rank=0, local_size=2, num_threads=1)
    hook = net.validation_step
    assert StaticInference(net, "auto", "float32", OFF, two).wrap("v", hook) is hook
    assert StaticInference(net, "eager", "float32", OFF, ENV).wrap("v", hook) is hook


def test_bfloat16_is_refused_off_the_fast_path_and_on_a_cpu_without_bf16_units(monkeypatch):
    net = probe("resnet18")
    with pytest.raises(ConfigError, match=r"^Eval\.precision: bfloat16 runs on the CPU fast path only"):
        StaticInference(net, "eager", "bfloat16", OFF, ENV)
    monkeypatch.setattr(fast_path, "cpu_info", lambda: {"model": "Old CPU", "flags": ["avx2", "avx512f"]})
    with pytest.raises(ConfigError, match=r"^Eval\.precision: bfloat16 needs a CPU with AVX512-BF16 or AMX-BF16 "
                                          r"units, which this one \(Old CPU\) lacks"):
        StaticInference(net, "auto", "bfloat16", OFF, ENV)


def test_bfloat16_features_are_bfloat16_and_within_its_bound():
    bfloat16_units_or_skip()
    # Catches Eval.precision: bfloat16 silently running float32 (errors of 1e-6, not bfloat16's
    # 1e-3..1e-2), and a bfloat16 program beyond the bound the check applies.
    net, images = probe("resnet50"), batch(size=2)
    hooks = {"extract_features": lambda b: {"features": net.extract_features(b[0])}}
    got, _ = run_static(net, hooks, images, precision="bfloat16")
    want = eager(hooks["extract_features"], images)["features"]
    relative = np.abs(got["extract_features"]["features"] - want).max() / np.abs(want).max()
    assert 1e-4 < relative < static_inference.TOLERANCE["bfloat16"], relative


@pytest.mark.parametrize("protocol", ["knn", "linear", "svm"])
def test_the_evaluator_gives_the_eager_results_on_the_fast_path(folders, protocol, caplog):  # noqa: F811
    # Catches (each shown by mutation for knn) a protocol whose hook the Evaluator does not wrap (no
    # log line of its check) and a session that is not open around the protocol (the step raises).
    tmp_path = folders[0]
    results = {}
    caplog.set_level(logging.INFO, logger="ppmoco")
    for execution in ("eager", "auto"):
        cfg = oracles.config(protocol, *oracles.datasets(tmp_path))
        cfg["Engine"]["execution"] = execution
        net = probe("resnet18", module=LinearEval)
        results[execution] = Evaluator(cfg, net, ENV)()[protocol]
    checked = [r.getMessage() for r in caplog.records if r.getMessage().startswith("static evaluation")]
    assert len(checked) == 1 and "checked against eager" in checked[0], checked
    assert results["auto"] == pytest.approx(results["eager"], abs=1e-6)
