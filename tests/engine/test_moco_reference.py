"""ppmoco's eager MoCo step, with ppmoco's oneDNN convolution and with Paddle's (Engine.conv), equals
an independent PyTorch step.

The reference (tests/torch_moco_reference.py) is written from facebookresearch/moco builder.py.
Each configuration runs 3 steps, each from the float64 reference's own state (tests/moco_equivalence.py
says why), with standard widths and real head sizes. Every bound is set against float32's own
spread, measured in the same test: a float32 PyTorch step compared with the float64 one the same way.

Teacher-forced bounds, per tensor and per group, none exempt: the relative error of a tensor's update
(tests/moco_equivalence.py update_errors) must satisfy own[t] <= FACTOR * float32[t] + SLACK[group],
float32[t] being float32 PyTorch's error for that same tensor at that step, for four groups:
- query: the query encoder's parameters after the SGD step;
- statistics: BatchNorm running means and variances of both encoders;
- key: the key encoder's parameters after the momentum update (zero at step 1, where the encoders
  are equal: the absolute norm then, 0 in float32 PyTorch and in ppmoco);
- queue: the columns the step enqueued.
The loss obeys the same rule (relative error), and queue_ptr must be equal.

Measured (5 setups x 3 steps, both convolutions; quantiles p50 / p90 / p99 / max of each tensor's
error; own/float32 = the ratio where float32's error is not 0):
- query (2502 tensors): ppmoco 3.7e-4 / 1.2e-2 / 2.0e-2 / 2.8e-2, float32 7.1e-4 / 1.0e-2 / 1.2e-2 /
  1.4e-2; own/float32 p50 1, p90 1.7, max 2500. Slack needed over 4x float32: 7.5e-3 (Paddle's
  convolutions, r18 CIFAR stem bn_splits 2, step 1: layer3/layer4 off by 0.5% where float32 is
  at 3e-6; not seen with oneDNN's convolution; presumably a ReLU flip, not investigated).
- statistics (3192): ppmoco 7.5e-7 / 4.0e-6 / 2.0e-5 / 3.6e-5, float32 8.4e-7 / 4.5e-6 / 2.0e-5 /
  3.4e-5; own/float32 0.5 to 5; slack needed over 4x float32: 6.5e-8.
- key (2502): ppmoco equal to float32 PyTorch for every tensor (own/float32 exactly 1; both average
  in float32 the same way; 0 for both at step 1); p50 6.2e-7, max 0.23 (the update (1-m)(q-k)
  cancels against k).
- queue (30 steps): ppmoco 1.6e-6 / 2.9e-5 / 3.4e-5 max, own/float32 0.69 to 1.4; no slack needed
  over 2x float32.
- loss (30 steps): ppmoco 2.1e-7 / 1.6e-6 / 7.1e-6 max, float32 2.6e-6 max; own/float32 up to 37
  (where float32 is at 4e-8); slack needed over 4x float32: 1.45e-6.
Bounds (FACTOR, SLACK): 4x and 2x the needed slack for query (1.5e-2) and loss (3e-6), 4x and 3x for
statistics (2e-7), 2x and 1e-6 for key (measured: 1x and 0) and 4x and 1e-6 for the queue. The old
pooled bounds (every update within 4x float32's worst + 5e-2, p90 within 4x float32's p90 + 1e-2)
let through every mutation in MUTATIONS below but a whole query stage scaled by 1.03.

Free-running (default setup, 3 steps of its own; distance from float64 as in _distances): float32
PyTorch query 4.4e-2, statistics 8.6e-4, key 4.2e-3, queue 4.0e-5, worst loss 7.5e-5; ppmoco with
oneDNN's convolutions within 0.3% of each of those (the same drift, presumably the same early ReLU flip), with
Paddle's 8.8e-4, 9.9e-7, 3.6e-4, 1.3e-6 and 5.0e-7. FREE_FLOOR is about twice Paddle's figures.
"""
import numpy as np
import pytest

from moco_equivalence import GROUPS, Setup, compare, free_run, group, reference_trajectory, update_errors
from optional_deps import torch_or_skip

torch_or_skip()

SETUPS = {
    # The urgent issue's setup: ImageNet stem at 64 px (2x2 maps in the last stage), v2 head 512-256-128.
    "r18_imagenet_stem_64px_v2": Setup(),
    # The r18c_32 benchmark model (CIFAR stem, default widths, head 512-512-128), with two BN groups
    # so that the key batch's shuffle changes the statistics each key is normalised with.
    "r18_cifar_stem_32px_v2_bn_splits_2": Setup(cifar_stem=True, px=32, hidden_dim=512, bn_splits=2),
    "r18_imagenet_stem_64px_v1": Setup(hidden_dim=None),
    # Bottleneck blocks with the v2 head; the v1 head is covered on ResNet-18 (a ResNet-50 v1 case
    # cost a minute of CI for no axis the others miss).
    "r50_imagenet_stem_64px_v2": Setup(arch="resnet50", hidden_dim=2048),
    # The batch that crashed oneDNN's add_grad natively.
    "r18_imagenet_stem_64px_batch_1": Setup(batch=1),
}
DEFAULT = "r18_imagenet_stem_64px_v2"

FACTOR = {"loss": 4.0, "query": 4.0, "statistics": 4.0, "key": 2.0, "queue": 4.0}
SLACK = {"loss": 3e-6, "query": 1.5e-2, "statistics": 2e-7, "key": 1e-6, "queue": 1e-6}
# Free-running: after 3 steps of its own, ppmoco's distance from float64 (loss: the worst step's
# relative error; state: per group, ||x - x64|| / ||x64 - x0||, the group's tensors as one vector)
# within FREE_FACTOR x float32 PyTorch's own distance + FREE_FLOOR.
FREE_FACTOR = 2.0
FREE_FLOOR = {"loss": 1e-6, "query": 2e-3, "statistics": 2e-6, "key": 1e-3, "queue": 3e-6}


@pytest.fixture(scope="module")
def runs():
    """compare() results by (setup name, candidate): the float32 spread and ppmoco's runs, each
    computed once; the mutation test below keeps the default setup's states for the main test."""
    cache = {}

    def get(name, candidate, keep_states=False):
        if (name, candidate) not in cache:
            if candidate == "float32":
                cache[name, candidate] = compare(SETUPS[name], "float32")
            else:
                cache[name, candidate] = compare(SETUPS[name], conv=candidate, keep_states=keep_states)
        return cache[name, candidate]

    get.cache = cache
    return get


def violations(own, f32):
    """Every tensor (and the loss) of one step outside FACTOR x float32's error + its group's slack."""
    errors = dict(own["updates"], queue=own["queue_update"], loss=own["loss"])
    spread = dict(f32["updates"], queue=f32["queue_update"], loss=f32["loss"])
    out = []
    for key, error in errors.items():
        kind = "loss" if key == "loss" else group(key)
        bound = FACTOR[kind] * spread[key] + SLACK[kind]
        if not error <= bound:
            out.append(f"{kind} {key}: {error:.3g} > {bound:.3g} (float32: {spread[key]:.3g})")
    if own["queue_ptr"][0] != own["queue_ptr"][1]:
        out.append(f"queue_ptr {own['queue_ptr']}")
    return out


def old_violations(own, f32):
    """The bounds this test had before (pooled, p90 and worst of all tensors but the queue), kept to
    show that the mutations below slipped through them."""
    out = [f"{k} {own[k]:.3g}" for k in ("loss", "queue") if own[k] > 1e-4]
    values, values_32 = np.array(list(own["updates"].values())), np.array(list(f32["updates"].values()))
    if np.quantile(values, 0.9) > 4 * np.quantile(values_32, 0.9) + 1e-2:
        out.append("p90")
    if values.max() > 4 * values_32.max() + 5e-2:
        out.append("worst")
    return out


# Every setup with the convolutions CPU training uses by default (Engine.conv: auto: ppmoco's oneDNN
# operator) and with Paddle's (GPUs, Engine.conv: paddle).
CONVS = [(name, conv) for name in SETUPS for conv in ("onednn", "paddle")]


def _mutated(step, start, ref, state):
    own = dict(step, updates=update_errors(start, state, ref),
               queue_update=update_errors(start, state, ref, queue=True)["queue"])
    own["loss"] = step["loss"]
    return own


def _scale_update(start, state, keys, factor):
    return dict(state, **{k: start[k] + factor * (state[k] - start[k]) for k in keys})


# Each mutation models a fault the pooled bounds let through; each must fail its own group's bound.
MUTATIONS = {
    # The query encoder's projection head updated 2% too far (a learning rate or weight decay slightly
    # off on some parameters). Scaling all of layer3 by 1.03 already failed the old p90 bound.
    "query_head_update_x1.02": ("query", lambda start, state: _scale_update(
        start, state, [k for k in state if k.startswith("encoder_q.head.")], 1.02)),
    # BatchNorm statistics' momentum 0.9 -> 0.901: every running-statistics update 1% short.
    "bn_momentum_off_by_1e-3": ("statistics", lambda start, state: _scale_update(
        start, state, [k for k in state if group(k) == "statistics"], 0.99)),
    # (The key encoder's statistics not updated at all already failed the old bounds: not listed.)
    # MoCo's m 0.99 -> 0.9901: the key encoder's update (1 - m)(q - k) 1% short.
    "m_off_by_1e-4": ("key", lambda start, state: _scale_update(
        start, state, [k for k in state if group(k) == "key"], 0.99)),
    # The enqueued keys 0.1% too long (normalised in a lower precision, or a stale scale).
    "queue_keys_x1.001": ("queue", lambda start, state: dict(
        state, queue=start["queue"] + 1.001 * (state["queue"] - start["queue"]))),
}


def test_each_bound_bites(runs):
    """The default setup's ppmoco run (Paddle's convolutions), mutated after each step: the pooled
    bounds pass every mutation, the per-group bounds fail each in its own group."""
    own_steps = runs(DEFAULT, "paddle", keep_states=True)
    spread = runs(DEFAULT, "float32")
    trajectory = reference_trajectory(SETUPS[DEFAULT])
    for name, (kind, mutate) in MUTATIONS.items():
        old, new = [], []
        for step, f32, (start, _, _, _, _, ref) in zip(own_steps, spread, trajectory):
            own = _mutated(step, start, ref, mutate(start, step["state"]))
            old += old_violations(own, f32)
            new += violations(own, f32)
        assert not old, f"{name}: the old bounds already failed it: {old}"
        assert any(v.startswith(kind + " ") for v in new), f"{name}: passes the {kind} bounds"
    for step in own_steps:
        del step["state"]


def _distances(state, truth, initial):
    """Per group: ||state - truth|| / ||truth - initial|| over the group's tensors together."""
    out = {}
    for kind in GROUPS:
        keys = [k for k in truth if k != "queue_ptr" and group(k) == kind]
        num = sum(float(np.sum((state[k].astype("float64") - truth[k]) ** 2)) for k in keys)
        den = sum(float(np.sum((truth[k] - initial[k].astype("float64")) ** 2)) for k in keys)
        out[kind] = (num / den) ** 0.5
    return out


@pytest.mark.slow
def test_three_free_steps_stay_as_close_to_float64_as_float32_does():
    """Not teacher-forced: ppmoco (oneDNN convolutions, CPU training's default) runs 3 steps from the
    initial state on its own (before the per-setup tests, which drop this setup's
    reference trajectory); its losses and final state are compared with float64 PyTorch's,
    against float32 PyTorch's own drift over the same 3 steps."""
    setup = SETUPS[DEFAULT]
    trajectory = reference_trajectory(setup)
    initial, truth = trajectory[0][0], trajectory[-1][5]
    ref_losses = [step[4] for step in trajectory]
    result = {}
    for candidate, conv in (("float32", "paddle"), ("ppmoco", "onednn")):
        losses, state = free_run(setup, candidate, conv)
        result[candidate] = dict(_distances(state, truth, initial),
                                 loss=max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)))
        assert int(state["queue_ptr"][0]) == int(truth["queue_ptr"][0])
    failed = [f"{k}: {result['ppmoco'][k]:.3g} > {FREE_FACTOR} x float32's {result['float32'][k]:.3g} + {floor:.3g}"
              for k, floor in FREE_FLOOR.items()
              if not result["ppmoco"][k] <= FREE_FACTOR * result["float32"][k] + floor]
    assert not failed, "\n".join(failed)


@pytest.mark.slow
@pytest.mark.parametrize("name,conv", CONVS)
def test_step_equals_the_pytorch_reference(name, conv, runs):
    spread = runs(name, "float32")
    failed = []
    for i, (own, f32) in enumerate(zip(runs(name, conv), spread)):
        failed += [f"step {i + 1}: {v}" for v in violations(own, f32)]
    runs.cache.pop((name, conv))
    assert not failed, f"{name}, {conv} convolutions:\n" + "\n".join(failed)


def test_float32_is_well_conditioned_at_these_sizes(runs):
    """The tolerances above lean on float32 itself staying close to float64 for these setups."""
    for name in ("r18_imagenet_stem_64px_v2", "r18_cifar_stem_32px_v2_bn_splits_2"):
        for step in runs(name, "float32"):
            assert step["loss"] < 1e-5 and step["queue"] < 1e-5
            assert np.median(list(step["updates"].values())) < 1e-4
