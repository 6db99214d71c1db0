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
        optimizer._create_accumulators(paddle.base.framework.default_main_program().global_block(),
                                       optimizer._parameter_list)
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

    def load(self, state, velocity):
        for key, tensor in self.module.state_dict().items():
            paddle.assign(state[key].astype("int64" if key == "queue_ptr" else "float32"), output=tensor)
        accumulators = velocities(self.optimizer)
        for key, value in velocity.items():
            paddle.assign(value.astype("float32"), output=accumulators[self.params[key].name])

    def step(self, views):
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
        return self.ref.step(views[0], views[1], next(self.perms))["loss"]

    def state(self):
        return self.ref.state()


_TRAJECTORIES = {}


def reference_trajectory(setup):
    """The float64 reference's steps: [(state, velocity, views, perm, loss, state after)], cached for
    the latest setup only: a ResNet-50 trajectory holds gigabytes of float64 states, and the tests ask
    for one setup's several times in a row."""
    if setup not in _TRAJECTORIES:
        _TRAJECTORIES.clear()
        truth = setup.reference(numpy_state(setup.moco()), "float64")
        steps = []
        for views, perm in zip(setup.views(), setup.permutations()):
            start, velocity = truth.state(), truth.velocity()
            loss = truth.step(views[0], views[1], perm)["loss"]
            steps.append((start, velocity, views, perm, loss, truth.state()))
        _TRAJECTORIES[setup] = steps
    return _TRAJECTORIES[setup]


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


def compare(setup, candidate="ppmoco", conv="paddle", keep_states=False):
    """Per step: {loss, queue, queue_ptr, updates} of `candidate` ("ppmoco"'s eager step, or the
    "float32" reference) against the float64 reference, each step from the reference's own state;
    ppmoco's steps with `conv`'s convolutions (Engine.conv: "paddle" or "onednn"). `updates` holds
    every tensor's relative update error but the queue's, which is under `queue_update` (the
    enqueued columns' error relative to their change); with `keep_states`, `state` holds the
    candidate's state after the step (for mutating it afterwards, see update_errors)."""
    trajectory = reference_trajectory(setup)
    if candidate == "float32":
        runner = ReferenceRunner(setup, trajectory[0][0], [step[3] for step in trajectory])
    else:
        runner = PpmocoRunner(setup, conv)
        paddle.seed(123)  # ppmoco draws the reference's permutations from here, one a step
    results = []
    for start, velocity, views, _, ref_loss, ref in trajectory:
        runner.load(start, velocity)
        loss = runner.step(views)
        own = runner.state()
        results.append({"loss": abs(loss - ref_loss) / abs(ref_loss),
                        "queue": float(np.abs(own["queue"] - ref["queue"]).max()),
                        "queue_ptr": (int(own["queue_ptr"][0]), int(ref["queue_ptr"][0])),
                        "updates": update_errors(start, own, ref),
                        "queue_update": update_errors(start, own, ref, queue=True)["queue"]})
        if keep_states:
            results[-1]["state"] = own
    return results


def free_run(setup, candidate="ppmoco", conv="paddle"):
    """`candidate` ("ppmoco" or "float32") run `setup.steps` steps on its own from the initial state:
    (losses, final state)."""
    trajectory = reference_trajectory(setup)
    if candidate == "float32":
        runner = ReferenceRunner(setup, trajectory[0][0], [step[3] for step in trajectory])
    else:
        runner = PpmocoRunner(setup, conv)
        runner.load(trajectory[0][0], {})
        paddle.seed(123)
    losses = [runner.step(views) for _, _, views, _, _, _ in trajectory]
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
