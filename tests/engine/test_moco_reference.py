"""ppmoco's eager MoCo step, with ppmoco's oneDNN convolution and with Paddle's (Engine.conv), equals
an independent PyTorch step.

The reference (tests/torch_moco_reference.py) is written from facebookresearch/moco builder.py.
Each configuration runs 3 steps, each from the float64 reference's own state (tests/moco_equivalence.py
says why), with standard widths and real head sizes. Every bound is set against float32's own
spread, measured in the same test: a float32 PyTorch step compared with the float64 one the same way.

Teacher-forced bounds, per tensor and per group, none exempt: the relative error of a tensor's update
(tests/moco_equivalence.py update_errors) must satisfy own[t] <= FACTOR * float32[t] + SLACK[group]
(FACTOR, SLACK and violations in tests/moco_equivalence.py), float32[t] being float32 PyTorch's error
for that same tensor at that step, for four groups:
- query: the query encoder's parameters after the SGD step;
- statistics: BatchNorm running means and variances of both encoders;
- key: the key encoder's parameters after the momentum update (zero at step 1, where the encoders
  are equal: the absolute norm then, 0 in float32 PyTorch and in ppmoco);
- queue: the columns the step enqueued.
The loss obeys the same rule (relative error), and queue_ptr must be equal.

ReLU flips. A step that fails these bounds and flips ReLU units of its own (a unit float64 puts
within float32 PyTorch's own error of zero, with the other sign than float64's, where float32 PyTorch
keeps float64's) is compared again with the float64 reference flipped at those units
(moco_equivalence.compare). Measured, 4 of the 30 (setup, convolution, step) runs need it; the
largest was the open issue's outlier, Paddle's convolutions on r18_cifar_stem_32px_v2_bn_splits_2,
step 1, where stem to layer4.0.conv1 were 0.39 to 0.75% off with float32 PyTorch at 3e-6 to 3.4e-3.
Recording every query-encoder ReLU input there: float32 PyTorch, ppmoco with oneDNN's convolutions
and with Paddle's all flip one unit in layer2.1's output ReLU of BN group 2 (float64 -2.7e-8); Paddle's
convolutions alone also flip one in layer4.0's first ReLU of BN group 2 (image 1, channel 329, (3, 2)):
float64 -2.4e-7, Paddle's +7.9e-7, while that ReLU input's largest float32 error is 7.9e-6. The unit's
gradient then passes, and everything it flows back through moves: layer4.0.bn1.bias off by 7.5e-3 but
its weight unchanged (x-hat is near 0 there), layer4.0.conv2 and downsample unchanged, everything from
layer4.0.conv1 back to the stem 3.9e-3 to 6.5e-3. With the float64 reference flipped at that one unit,
every tensor's error is float32 PyTorch's for that tensor (layer4.0.bn1.bias 3.5e-6 vs 3.0e-6,
layer4.0.conv1 3.5e-5 vs 3.5e-5). Float32 chaos, not a defect: no BN, shuffle or gradient difference.
The others: Paddle's on ResNet-50, step 1 (9 own flips; layer3.5 off by 2.8e-2 where float32 is at
5.9e-3, which has flips of its own), oneDNN's on the same CIFAR setup, step 2 (1 flip, layer2.1's output
ReLU; 4.3e-4 where float32 is at 3e-6) and on the v1 head, step 2 (1 flip, layer4.1; 3.3e-4 vs 3e-6).
With their flips accounted for, each fits 4x float32 (the least room: 4.1e-6).

Measured (5 setups x 3 steps, both convolutions, flips accounted for as above; quantiles p50 / p90 /
p99 / max of each tensor's error; own/float32 = the ratio where float32's error is not 0):
- query (2502 tensors): ppmoco 3.4e-4 / 6.2e-3 / 1.6e-2 / 1.9e-2, float32 7.1e-4 / 1.0e-2 / 1.2e-2 /
  1.4e-2 (float32's own flips: ResNet-50 flips 17 to 20 units a step); own/float32 p50 0.99, p90 1.1,
  p99 1.9, max 2.9. No slack needed over 4x float32 (the least room, 3.9e-6: CIFAR, oneDNN, step 1,
  layer4.1.bn2.bias at 2.3e-6 where float32 is at 1.5e-6).
- statistics (3192): ppmoco 7.5e-7 / 4.0e-6 / 2.0e-5 / 3.6e-5, float32 8.4e-7 / 4.5e-6 / 2.0e-5 /
  3.4e-5; own/float32 0.5 to 5; slack needed over 4x float32: 6.5e-8.
- key (2502): ppmoco equal to float32 PyTorch for every tensor (own/float32 exactly 1; both average
  in float32 the same way; 0 for both at step 1); p50 6.2e-7, max 0.23 (the update (1-m)(q-k)
  cancels against k).
- queue (30 steps): ppmoco 1.6e-6 / 2.9e-5 / 3.4e-5 max, own/float32 0.69 to 1.4; no slack needed
  over 4x float32.
- loss (30 steps): ppmoco 2.1e-7 / 1.6e-6 / 7.1e-6 max, float32 2.6e-6 max; own/float32 up to 37
  (where float32 is at 4e-8); slack needed over 4x float32: 1.45e-6.
Bounds (FACTOR, SLACK): 4x and 2x the needed slack for loss (3e-6), 4x and 3x for statistics (2e-7),
2x and 1e-6 for key (measured: 1x and 0), 4x and 1e-6 for query and the queue (none needed; 1e-6 is
below the smallest query error, float32's 1.5e-6). The query slack was 1.5e-2 to let the outlier through;
a stage's update 0.5% off (MUTATIONS) passed that and fails this. The old pooled bounds (every update
within 4x float32's worst + 5e-2, p90 within 4x float32's p90 + 1e-2) let through every mutation in
MUTATIONS below but a whole query stage scaled by 1.03.

Free-running (default setup, 3 steps of its own; distance from float64 as in _distances): float32
PyTorch query 4.4e-2, statistics 8.6e-4, key 4.2e-3, queue 4.0e-5, worst loss 7.5e-5; ppmoco with
oneDNN's convolutions within 0.5% of each but the loss (6.7e-5): both flip the same unit in step 2
(layer4.0's output ReLU, float64 -1.3e-5), after which over a thousand units differ in step 3. With Paddle's
convolutions, which do not flip it: 8.8e-4, 9.9e-7, 3.6e-4, 1.3e-6 and 5.0e-7. FREE_FLOOR is about
twice Paddle's figures. The teacher-forced comparison loads the reference's SGD momentum buffers
before every step and so cannot see what one step hands the next; FREE_MUTATIONS are such faults.
"""
import numpy as np
import paddle
import pytest

from moco_equivalence import (
    GROUPS,
    Setup,
    compare,
    free_run,
    group,
    reference_trajectory,
    update_errors,
    velocities,
    violations,
)
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
                cache[name, candidate] = compare(SETUPS[name], conv=candidate, keep_states=keep_states,
                                                 spread=get(name, "float32"))
        return cache[name, candidate]

    get.cache = cache
    return get


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
    # A query stage's update 0.5% too far, which the former query slack (1.5e-2) let through.
    "query_layer3_update_x1.005": ("query", lambda start, state: _scale_update(
        start, state, [k for k in state if k.startswith("encoder_q.backbone.layer3.")], 1.005)),
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


def _free_drift(candidate, conv, between_steps=None):
    """The default setup run 3 steps on its own (free_run): its distances from float64 PyTorch's
    (_distances) and its losses' worst relative error (`loss`)."""
    trajectory = reference_trajectory(SETUPS[DEFAULT])
    initial, truth = trajectory[0][0], trajectory[-1][5]
    losses, state = free_run(SETUPS[DEFAULT], candidate, conv, between_steps)
    assert int(state["queue_ptr"][0]) == int(truth["queue_ptr"][0])
    return dict(_distances(state, truth, initial),
                loss=max(abs(a - b[4]) / abs(b[4]) for a, b in zip(losses, trajectory)))


def free_violations(own, f32):
    return [f"{k}: {own[k]:.3g} > {FREE_FACTOR} x float32's {f32[k]:.3g} + {floor:.3g}"
            for k, floor in FREE_FLOOR.items() if not own[k] <= FREE_FACTOR * f32[k] + floor]


def _velocity_times(factor):
    def scale(runner):
        for velocity in velocities(runner.optimizer).values():
            paddle.assign(velocity * factor, output=velocity)
    return scale


FREE_MUTATIONS = {
    # Catches: the SGD momentum buffers handed from one step to the next 10% short (decayed once
    # more in between); measured, it fails every group, the query's at 0.13 against a bound of 0.09.
    # Losing them outright (an optimizer rebuilt, or its accumulators reset, every step) fails
    # query, statistics, key and queue by 7 to 37x their bounds.
    "velocity_x0.9_between_steps": _velocity_times(0.9),
}


@pytest.fixture(scope="module")
def free_float32():
    """float32 PyTorch's own drift from float64 over the default setup's 3 free steps."""
    return _free_drift("float32", "paddle")


@pytest.mark.slow
def test_three_free_steps_stay_as_close_to_float64_as_float32_does(free_float32):
    """Not teacher-forced: ppmoco (oneDNN convolutions, CPU training's default) runs 3 steps from the
    initial state on its own (before the per-setup tests, which drop this setup's
    reference trajectory); its losses and final state are compared with float64 PyTorch's,
    against float32 PyTorch's own drift over the same 3 steps."""
    failed = free_violations(_free_drift("ppmoco", "onednn"), free_float32)
    assert not failed, "\n".join(failed)


@pytest.mark.slow
@pytest.mark.parametrize("name", FREE_MUTATIONS)
def test_the_free_running_bounds_bite(name, free_float32):
    """The same free run with a fault between steps, which no teacher-forced step can see, fails."""
    failed = free_violations(_free_drift("ppmoco", "onednn", FREE_MUTATIONS[name]), free_float32)
    assert any(v.startswith("query:") for v in failed), f"{name} passes the free-running bounds: {failed}"


@pytest.mark.slow
@pytest.mark.parametrize("name,conv", CONVS)
def test_step_equals_the_pytorch_reference(name, conv, runs):
    spread = runs(name, "float32")
    failed = []
    for i, (own, f32) in enumerate(zip(runs(name, conv), spread)):
        flips = f" (against float64 with {own['flips']} own ReLU flips)" if "flips" in own else ""
        failed += [f"step {i + 1}{flips}: {v}" for v in violations(own, f32)]
    runs.cache.pop((name, conv))
    assert not failed, f"{name}, {conv} convolutions:\n" + "\n".join(failed)


def test_float32_is_well_conditioned_at_these_sizes(runs):
    """The tolerances above lean on float32 itself staying close to float64 for these setups."""
    for name in ("r18_imagenet_stem_64px_v2", "r18_cifar_stem_32px_v2_bn_splits_2"):
        for step in runs(name, "float32"):
            assert step["loss"] < 1e-5 and step["queue"] < 1e-5
            assert np.median(list(step["updates"].values())) < 1e-4
