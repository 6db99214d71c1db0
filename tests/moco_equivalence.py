"""ppmoco's MoCo step against the PyTorch reference (tests/torch_moco_reference.py),
shared by the equivalence tests and by whoever re-measures their tolerances.

Every step is compared from one common state: before each step, ppmoco (and a float32 reference,
when one is measured) is given the float64 reference's weights, BN statistics, queue and SGD
momentum buffers; the same views and shuffle permutation go in. Compounding is left out on purpose:
a 1e-6 difference in float32 flips a few ReLUs a step later and three steps of a small MoCo then
differ by percents even between float32 and float64 PyTorch, which would hide any real fault.
Steps 2 and 3 still run with momentum buffers, a moved key encoder and a filling queue.

Updates are compared, not values: for every tensor, ||delta - delta_ref|| / ||delta_ref||, delta
being the step's change from the common state (the absolute norm where delta_ref is zero).

Even from a common state, float32 flips a ReLU now and then: a pre-activation float64 puts within
float32's rounding of zero (1e-7 where float32 is off by 1e-5) comes out with the other sign, the
unit's gradient passes or not, and every tensor upstream of it moves by up to a few percent of its
update. Which units flip depends on the order a convolution accumulates in. Flips float32 PyTorch
shares are in its spread; a flip of the candidate's own is not, so a step failing the bounds with
such flips is compared again with a float64 reference whose masks at those units are flipped the
same way (compare(); a unit counts only where float64's value lies within float32 PyTorch's largest
error on that ReLU input; every other difference stays).
"""
import dataclasses

import numpy as np
import paddle

from ppmoco.engine.step import TrainStep, build_optimizer
from ppmoco.modules.moco import MoCo

OPT = {"momentum": 0.9, "weight_decay": 1e-4}


@dataclasses.dataclass(frozen=True)
class Setup:
    """One MoCo configuration and input size (defaults: the urgent issue's standard setup)."""

    arch: str = "resnet18"
    px: int = 64
    batch: int = 8
    hidden_dim: int = 256  # None: MoCo v1's linear head
    dim: int = 128
    cifar_stem: bool = False
    widths: tuple = (64, 128, 256, 512)
    K: int = 64
    T: float = 0.2
    m: float = 0.99
    bn_splits: int = 1
    steps: int = 3
    lr: float = 0.05

    def moco(self):
        paddle.seed(0)
        encoder = {"name": self.arch, "widths": list(self.widths), "cifar_stem": self.cifar_stem}
        projector = None if self.hidden_dim is None else {"hidden_dim": self.hidden_dim}
        module = MoCo(base_encoder=encoder, projector=projector, dim=self.dim, K=self.K, m=self.m,
                      T=self.T, bn_splits=self.bn_splits)
        module.train()
        return module

    def views(self):
        rng = np.random.default_rng(7)
        shape = (self.batch, 3, self.px, self.px)
        return [[rng.standard_normal(shape).astype("float32") for _ in range(2)] for _ in range(self.steps)]

    def permutations(self):
        """The shuffle permutations ppmoco draws (one randperm a step) after paddle.seed(123)."""
        paddle.seed(123)
        return [paddle.randperm(self.batch).numpy() for _ in range(self.steps)]

    def reference(self, state, dtype):
        import torch

        from torch_moco_reference import MoCoReference
        return MoCoReference(state, self.arch, self.widths, self.cifar_stem, self.hidden_dim,
                             self.dim, self.m, self.T, self.bn_splits, self.lr, OPT["momentum"],
                             OPT["weight_decay"], getattr(torch, dtype))


def velocities(optimizer):
    """{parameter name: velocity tensor} of a Momentum optimizer: the live tensors its step updates
    (`state_dict()` gives copies); made now if its first step has not made them yet."""
    if "velocity" not in optimizer._accumulators or not optimizer._accumulators["velocity"]:
        groups = optimizer._param_groups  # parameters, or parameter groups (weight decay groups)
        params = [p for g in groups for p in g["params"]] if isinstance(groups[0], dict) else groups
        optimizer._create_accumulators(paddle.base.framework.default_main_program().global_block(), params)
    return optimizer._accumulators["velocity"]


def numpy_state(module):
    return {k: v.numpy().copy() for k, v in module.state_dict().items()}


class PpmocoRunner:
    """ppmoco's module, optimizer and step, whose state can be set from a reference's."""

    def __init__(self, setup, conv="paddle"):
        self.module = setup.moco()
        self.optimizer = build_optimizer(OPT, self.module, setup.lr)
        self.step_fn = TrainStep(self.module, self.optimizer, {"enable": False}, conv)
        self.params = dict(self.module.named_parameters())
        self.relu_inputs = []  # the last step's query-encoder ReLU inputs, in call order
        for layer in self.module.encoder_q.sublayers():
            if isinstance(layer, paddle.nn.ReLU):
                layer.register_forward_post_hook(lambda _, inputs, out: self.relu_inputs.append(inputs[0].numpy()))

    def load(self, state, velocity):
        for key, tensor in self.module.state_dict().items():
            paddle.assign(state[key].astype("int64" if key == "queue_ptr" else "float32"), output=tensor)
        accumulators = velocities(self.optimizer)
        for key, value in velocity.items():
            paddle.assign(value.astype("float32"), output=accumulators[self.params[key].name])

    def step(self, views):
        self.relu_inputs = []
        return float(self.step_fn([paddle.to_tensor(v) for v in views])["loss"])

    def state(self):
        return numpy_state(self.module)


class ReferenceRunner:
    """A float32 PyTorch reference run the same teacher-forced way (the float32 spread)."""

    def __init__(self, setup, initial, permutations):
        self.ref = setup.reference(initial, "float32")
        self.perms = iter(permutations)

    def load(self, state, velocity):
        self.ref.load(state, velocity)

    def step(self, views):
        recorder = ReluInputs()
        loss = self.ref.step(views[0], views[1], next(self.perms), relu=recorder)["loss"]
        self.relu_inputs = recorder.inputs
        return loss

    def state(self):
        return self.ref.state()


class ReluInputs:
    """A PyTorch reference step's `relu` (MoCo v2's and v3's): records every input (numpy), computes the ReLU."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x):
        import torch.nn.functional as F
        self.inputs.append(x.detach().numpy().copy())
        return F.relu(x)


class FlippedRelu:
    """A PyTorch reference step's `relu`: the ReLU with the mask of given units flipped, {call: flat indices}."""

    def __init__(self, flips):
        self.flips, self.calls = flips, 0

    def __call__(self, x):
        import torch
        import torch.nn.functional as F
        units, self.calls = self.flips.get(self.calls), self.calls + 1
        if units is None:
            return F.relu(x)
        keep = (x > 0).flatten()
        units = torch.as_tensor(units)
        keep[units] = ~keep[units]
        return torch.where(keep.view_as(x), x, torch.zeros_like(x))


_TRAJECTORIES, _PRE_RELU = {}, {}


def reference_trajectory(setup):
    """The float64 reference's steps: [(state, velocity, views, perm, loss, state after)], cached for
    the latest setup only: a ResNet-50 trajectory holds gigabytes of float64 states, and the tests ask
    for one setup's several times in a row. Its query-encoder ReLU inputs are kept beside it."""
    if setup not in _TRAJECTORIES:
        _TRAJECTORIES.clear()
        _PRE_RELU.clear()
        truth = setup.reference(numpy_state(setup.moco()), "float64")
        steps, pre_relu = [], []
        for views, perm in zip(setup.views(), setup.permutations()):
            start, velocity = truth.state(), truth.velocity()
            recorder = ReluInputs()
            loss = truth.step(views[0], views[1], perm, relu=recorder)["loss"]
            steps.append((start, velocity, views, perm, loss, truth.state()))
            pre_relu.append(recorder.inputs)
        _TRAJECTORIES[setup], _PRE_RELU[setup] = steps, pre_relu
    return _TRAJECTORIES[setup]


def relu_spread(inputs, truth):
    """Per ReLU input of a float32 step: (its largest error from float64's, the flat indices of the
    units whose sign differs from float64's)."""
    return [(float(np.abs(x - t).max()), np.flatnonzero((x > 0) != (t > 0))) for x, t in zip(inputs, truth)]


def own_flips(inputs, truth, spread):
    """{ReLU call: flat indices} of the units whose sign differs from float64's (`truth`) while
    float64's value lies within float32 PyTorch's error on that input, and float32 PyTorch's sign
    (`spread`: relu_spread) does not: the candidate's own flips."""
    assert [x.shape for x in inputs] == [t.shape for t in truth], "the ReLU calls differ from the reference's"
    flips = {}
    for call, (x, t, (error, shared)) in enumerate(zip(inputs, truth, spread)):
        units = np.setdiff1d(np.flatnonzero(((x > 0) != (t > 0)) & (np.abs(t) <= error)), shared)
        if units.size:
            flips[call] = units
    return flips


def flipped_reference(setup, step, flips):
    """The float64 reference's step `step` (from its own state) with the ReLU units `flips` flipped:
    (loss, state after)."""
    start, velocity, views, perm, _, _ = reference_trajectory(setup)[step]
    truth = setup.reference(start, "float64")
    truth.load(start, velocity)
    loss = truth.step(views[0], views[1], perm, relu=FlippedRelu(flips))["loss"]
    return loss, truth.state()


GROUPS = ("query", "statistics", "key", "queue")
STATISTICS = ("._mean", "._variance")


def group(key):
    """The group a state-dict key is bounded in: the query encoder's parameters ("query"), BatchNorm
    running statistics of either encoder ("statistics"), the key encoder's parameters after the
    momentum update ("key"), or the queue."""
    if key == "queue":
        return "queue"
    if key.endswith(STATISTICS):
        return "statistics"
    return "query" if key.startswith("encoder_q.") else "key"


# The teacher-forced bounds: every tensor's update error (and the loss's relative error) within
# FACTOR x float32 PyTorch's error for that tensor + SLACK for its group; measured in
# tests/engine/test_moco_reference.py's docstring.
FACTOR = {"loss": 4.0, "query": 4.0, "statistics": 4.0, "key": 2.0, "queue": 4.0}
SLACK = {"loss": 3e-6, "query": 1e-6, "statistics": 2e-7, "key": 1e-6, "queue": 1e-6}


def violations(own, f32, skip=()):
    """Every tensor (and the loss) of one step (a compare() result) outside FACTOR x float32's error
    (`f32`, the float32 reference's result for that step) + its group's slack, but groups in `skip`."""
    errors = dict(own["updates"], queue=own["queue_update"], loss=own["loss"])
    spread = dict(f32["updates"], queue=f32["queue_update"], loss=f32["loss"])
    out = []
    for key, error in errors.items():
        kind = "loss" if key == "loss" else group(key)
        bound = FACTOR[kind] * spread[key] + SLACK[kind]
        if kind not in skip and not error <= bound:
            out.append(f"{kind} {key}: {error:.3g} > {bound:.3g} (float32: {spread[key]:.3g})")
    if own["queue_ptr"][0] != own["queue_ptr"][1]:
        out.append(f"queue_ptr {own['queue_ptr']}")
    return out


def step_errors(start, loss, own, ref_loss, ref):
    """{loss, queue, queue_ptr, updates, queue_update} of one step's `own` state and loss against
    the reference's."""
    return {"loss": abs(loss - ref_loss) / abs(ref_loss),
            "queue": float(np.abs(own["queue"] - ref["queue"]).max()),
            "queue_ptr": (int(own["queue_ptr"][0]), int(ref["queue_ptr"][0])),
            "updates": update_errors(start, own, ref),
            "queue_update": update_errors(start, own, ref, queue=True)["queue"]}


def compare(setup, candidate="ppmoco", conv="paddle", keep_states=False, spread=None):
    """Per step: {loss, queue, queue_ptr, updates} of `candidate` ("ppmoco"'s eager step, or the
    "float32" reference) against the float64 reference, each step from the reference's own state;
    ppmoco's steps with `conv`'s convolutions (Engine.conv: "paddle" or "onednn"). `updates` holds
    every tensor's relative update error but the queue's, which is under `queue_update` (the
    enqueued columns' error relative to their change); with `keep_states`, `state` holds the
    candidate's state after the step (for mutating it afterwards, see update_errors).

    float32's steps carry `relu` (relu_spread). Given them (`spread`), a ppmoco step that violates
    the bounds and flips ReLU units of its own (own_flips) is compared with the float64 reference
    flipped at those units instead (flipped_reference); `flips` then counts them."""
    trajectory = reference_trajectory(setup)
    if candidate == "float32":
        runner = ReferenceRunner(setup, trajectory[0][0], [step[3] for step in trajectory])
    else:
        runner = PpmocoRunner(setup, conv)
        paddle.seed(123)  # ppmoco draws the reference's permutations from here, one a step
    results = []
    for i, (start, velocity, views, _, ref_loss, ref) in enumerate(trajectory):
        runner.load(start, velocity)
        loss = runner.step(views)
        own = runner.state()
        results.append(step_errors(start, loss, own, ref_loss, ref))
        if candidate == "float32":
            results[-1]["relu"] = relu_spread(runner.relu_inputs, _PRE_RELU[setup][i])
        elif spread is not None and violations(results[-1], spread[i]):
            flips = own_flips(runner.relu_inputs, _PRE_RELU[setup][i], spread[i]["relu"])
            if flips:
                results[-1] = dict(step_errors(start, loss, own, *flipped_reference(setup, i, flips)),
                                   flips=sum(len(units) for units in flips.values()))
        if keep_states:
            results[-1]["state"] = own
    return results


def free_run(setup, candidate="ppmoco", conv="paddle", between_steps=None):
    """`candidate` ("ppmoco" or "float32") run `setup.steps` steps on its own from the initial state:
    (losses, final state). `between_steps(runner)`, if given, runs after each step (a fault in what
    one step hands the next)."""
    trajectory = reference_trajectory(setup)
    if candidate == "float32":
        runner = ReferenceRunner(setup, trajectory[0][0], [step[3] for step in trajectory])
    else:
        runner = PpmocoRunner(setup, conv)
        runner.load(trajectory[0][0], {})
        paddle.seed(123)
    losses = []
    for _, _, views, _, _, _ in trajectory:
        losses.append(runner.step(views))
        if between_steps is not None:
            between_steps(runner)
    return losses, runner.state()


def update_errors(start, state, reference, queue=False):
    """{key: relative error of the update} for every tensor but the queue (only the queue with
    `queue`): ||delta - delta_ref|| / ||delta_ref||, the absolute norm where delta_ref is zero."""
    errors = {}
    for key, value in start.items():
        if key == "queue_ptr" or (key == "queue") != queue:
            continue
        ref = reference[key].astype("float64") - value
        own = state[key].astype("float64") - value
        scale = np.linalg.norm(ref)
        errors[key] = float(np.linalg.norm(own - ref) / (scale if scale > 0 else 1.0))
    return errors
