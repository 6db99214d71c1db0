"""ppmoco's side of the MoCo v3 equivalence test (tests/engine/test_mocov3_reference.py), and, run under
`paddle.distributed.launch --nproc_per_node 2`, its two-process worker.

- `Setup`: one MoCo v3 configuration (backbone, image size, batch, head, optimizer and the run's geometry,
  which sets each compared step's learning rate and momentum);
- `PpmocoRunner`: ppmoco's MoCoV3 with the step `build_train_step` builds (the real optimizer, the
  convolutions `Engine.conv` names), driven as the Engine drives it: the learning rate from ppmoco's
  schedule set before each step, the step given its Progress; its state (module and optimizer) can be set
  from the reference's, for the teacher-forced comparison;
- `step_errors`: one step's loss, every tensor and the optimizer's state against the float64 reference's;
- `MUTATIONS`: faults patched into ppmoco, each of which the test shows failing.

As the worker (`python -m paddle.distributed.launch --nproc_per_node 2 dist_mocov3_worker.py FOLDER`): every
rank runs the steps a test saved in FOLDER (each from the float64 reference's state, on its half of the
batch), for ppmoco as it is and under each mutation the file names, compares its result with the
reference's (computed for two ranks) and writes the errors and a digest of every tensor that must be
equal on both ranks.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import sys

import numpy as np
import paddle

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
    sys.path[:0] = [os.path.abspath(os.path.join(HERE, "..", "..")), os.path.abspath(os.path.join(HERE, ".."))]

from ppmoco.engine import lars as lars_module  # noqa: E402
from ppmoco.engine.env import RunEnv  # noqa: E402
from ppmoco.engine.lr import build_schedule  # noqa: E402
from ppmoco.engine.step import build_train_step  # noqa: E402
from ppmoco.modules import moco_v3 as moco_v3_module  # noqa: E402
from ppmoco.modules.base import Progress  # noqa: E402

STATISTICS = ("._mean", "._variance")
GROUPS = ("loss", "online", "statistics", "momentum", "optimizer")


@dataclasses.dataclass(frozen=True)
class Setup:
    """One MoCo v3 configuration. The compared steps are iterations `first`.. of a run of `epochs` epochs of
    `iters_per_epoch` iterations with `warmup_epochs` of linear warmup: the learning rate and the momentum
    change every step (main_moco.py's adjust_learning_rate and adjust_moco_momentum, per iteration)."""

    arch: str = "resnet18"
    px: int = 64
    batch: int = 8
    dim: int = 256
    mlp_dim: int = 4096
    T: float = 1.0
    m: float = 0.99
    optimizer: str = "LARS"
    lr: float = 2.4  # moco-v3's base lr x 1024 / 256 (ResNet: 0.6, LARS; ViT: 1.5e-4, AdamW)
    weight_decay: float = 1e-6
    stop_grad_conv1: bool = False
    epochs: int = 4
    iters_per_epoch: int = 2
    warmup_epochs: int = 1
    first: int = 1
    steps: int = 3
    unrecorded: int = 0  # iterations the float64 reference runs before `first`, its state not compared

    @property
    def vit(self):
        return self.arch.startswith("vit")

    def encoder(self):
        if self.vit:
            return {"name": self.arch, "image_size": self.px, "stop_grad_conv1": self.stop_grad_conv1}
        return {"name": self.arch, "zero_init_residual": True}  # main_moco.py's torchvision ResNet

    def module(self):
        paddle.seed(0)
        module = moco_v3_module.MoCoV3(self.encoder(), dim=self.dim, mlp_dim=self.mlp_dim, T=self.T, m=self.m,
                                       m_cos=True)
        module.train()
        return module

    def optimizer_cfg(self):
        return {"name": self.optimizer, "weight_decay": self.weight_decay}

    def progress(self, i):
        """ppmoco's Progress of compared step i (0-based), as the Engine makes it."""
        it = self.first + i
        return Progress(epoch=it / self.iters_per_epoch, step=it, total_steps=self.epochs * self.iters_per_epoch)

    def views(self, i):
        rng = np.random.default_rng(7 + i)
        return [rng.standard_normal((self.batch, 3, self.px, self.px)).astype("float32") for _ in range(2)]

    def reference(self, dtype):
        """The PyTorch reference of this setup (tests/torch_mocov3_reference.py), in `dtype` ("float64"/"float32")."""
        from torch_mocov3_reference import MoCoV3Reference, torch
        # Paddle's AdamW conventions, given to the reference as it takes Paddle's BatchNorm variance, so that
        # every other difference stays visible: its betas are float32 (0.999 is 0.99900001287: 1 - beta2 is
        # 1.29e-5 off 0.001) and so are the beta powers of its bias corrections (paddle_beta_power).
        return MoCoV3Reference(self.arch, image_size=self.px, dim=self.dim, mlp_dim=self.mlp_dim, T=self.T,
                               optimizer=self.optimizer, weight_decay=self.weight_decay, betas=PADDLE_BETAS,
                               beta_power=paddle_beta_power, stop_grad_conv1=self.stop_grad_conv1,
                               dtype=getattr(torch, dtype))

    def reference_schedule(self, i):
        """(lr, m) of compared step i by main_moco.py's formulas (the reference's, not ppmoco's)."""
        from torch_mocov3_reference import adjust_learning_rate, adjust_moco_momentum
        epoch = (self.first + i) / self.iters_per_epoch
        return (adjust_learning_rate(self.lr, epoch, self.warmup_epochs, self.epochs),
                adjust_moco_momentum(self.m, epoch, self.epochs))


PADDLE_BETAS = (float(np.float32(0.9)), float(np.float32(0.999)))  # AdamW's defaults as Paddle holds them


def paddle_beta_power(beta, step):
    """beta ** step as Paddle's AdamW keeps it: a float32 accumulator that starts at beta and is multiplied by
    beta in float32 after each step. torch computes it in double; in float32, 1 - beta2 ** 2 (0.002) keeps only
    4 of its digits, so the first steps' bias corrections differ by up to ~1e-5."""
    power = np.float32(beta)
    for _ in range(int(step) - 1):
        power = np.float32(power * np.float32(beta))
    return float(power)


ENV = RunEnv(device="cpu", world_size=1, rank=0, local_size=1, num_threads=1)
NO_AMP = {"enable": False, "dtype": "float16", "level": "O1", "scale_loss": 1.0, "custom_white_list": [],
          "custom_black_list": []}
# Paddle's accumulators for each optimizer state the reference keeps (AdamW's beta powers are set apart).
ACCUMULATORS = {"LARS": {"mu": "mu"}, "AdamW": {"exp_avg": "moment1", "exp_avg_sq": "moment2"}}


def _set(tensor, value):
    """Copy `value` into the float32 tensor in place (set_value: paddle.assign goes through a Python list)."""
    tensor.set_value(np.ascontiguousarray(value, dtype="float32").reshape(tensor.shape))


class PpmocoRunner:
    """ppmoco's MoCoV3 and its training step (build_train_step), whose state can be set from the reference's."""

    def __init__(self, setup, conv="paddle"):
        self.setup = setup
        self.module = setup.module()
        self.step_fn = build_train_step({"conv": conv, "mix_precision": NO_AMP}, setup.optimizer_cfg(), self.module,
                                        setup.lr, ENV)
        self.optimizer = self.step_fn.optimizer
        self.schedule = build_schedule({"name": "CosineDecay", "learning_rate": setup.lr,
                                        "warmup_epochs": setup.warmup_epochs, "cosine_after_warmup": True,
                                        "update_unit": "step"})
        self.params = dict(self.module.named_parameters())
        self.trainable = {n for n, p in self.params.items() if not p.stop_gradient}
        self.stepped = False
        self.relu_inputs = []  # the last step's online-network ReLU inputs, in call order
        for network in (self.module.base_encoder, self.module.predictor):
            for layer in network.sublayers():
                if isinstance(layer, paddle.nn.ReLU):
                    layer.register_forward_post_hook(lambda _, inputs, out: self.relu_inputs.append(inputs[0].numpy()))

    def accumulators(self, name):
        """{parameter name: the live tensor} of accumulator `name`, made now if no step has made them yet."""
        if not self.optimizer._accumulators.get(name):
            block = paddle.base.framework.default_main_program().global_block()
            self.optimizer._create_accumulators(block, [self.params[n] for n in sorted(self.trainable)])
        return self.optimizer._accumulators[name]

    def load(self, state, optimizer_state):
        """The module's every tensor from `state` (a ppmoco state dict of arrays) and the optimizer's state from
        the reference's (MoCoV3Reference.optimizer_state(); empty before the first step: ppmoco's is fresh then)."""
        for key, tensor in self.module.state_dict().items():
            _set(tensor, state[key])
        if not optimizer_state:
            assert not self.stepped, "a fresh reference optimizer after ppmoco's has stepped"
            return
        for ref_name, name in ACCUMULATORS[self.setup.optimizer].items():
            accumulators = self.accumulators(name)
            for key, values in optimizer_state.items():
                _set(accumulators[self.params[key].name], values[ref_name])
        if self.setup.optimizer == "AdamW":  # Paddle's beta powers before step t + 1 are beta ** (t + 1)
            for name, beta in (("beta1_pow_acc", self.optimizer._beta1), ("beta2_pow_acc", self.optimizer._beta2)):
                accumulators = self.accumulators(name)
                for key, values in optimizer_state.items():
                    _set(accumulators[self.params[key].name], [paddle_beta_power(beta, values["step"] + 1)])

    def step(self, views, i, mutation=None):
        """Compared step i on numpy views, as the Engine runs it (its lr, its Progress); the loss.
        `mutation` (a MUTATIONS entry) is patched into ppmoco for the step."""
        progress = self.setup.progress(i)
        self.optimizer.set_lr(self.schedule(progress.epoch, self.setup.epochs))
        batch = [paddle.to_tensor(v) for v in views] + [paddle.zeros([views[0].shape[0]], dtype="int64")]
        self.relu_inputs = []
        with (MUTATIONS[mutation](self.module) if mutation else contextlib.nullcontext()):
            out = self.step_fn(batch, progress)
        self.stepped = True
        return float(out["loss"])

    def state(self):
        return {k: v.numpy() for k, v in self.module.state_dict().items()}  # numpy() copies

    def optimizer_state(self):
        """The optimizer's state in the reference's form (MoCoV3Reference.optimizer_state(), without `step`)."""
        out = {}
        for ref_name, name in ACCUMULATORS[self.setup.optimizer].items():
            accumulators = self.accumulators(name)
            for key in self.trainable:
                out.setdefault(key, {})[ref_name] = accumulators[self.params[key].name].numpy()
        return out


# ---------------------------------------------------------------- comparison

def group(key):
    """The group a compared quantity is bounded in: the loss; the online network's parameters after the
    optimizer step (base encoder = backbone + projector, and predictor); BatchNorm running statistics of every
    network; the momentum encoder's parameters after its update; the optimizer's state after the step."""
    if key == "loss":
        return "loss"
    if key.startswith("optimizer/"):
        return "optimizer"
    if key.endswith(STATISTICS):
        return "statistics"
    return "momentum" if key.startswith("momentum_encoder.") else "online"


def update_error(start, own, ref):
    """||delta - delta_ref|| / ||delta_ref||, delta being the change from `start`. Where the float64 reference's
    change is within its own rounding of zero (a frozen parameter, the momentum encoder's average of two equal
    tensors, the running mean of the predictor's input, which its projector's last BatchNorm centres), the
    error is relative to the tensor's size instead (at least 1): float32's drift."""
    ref = np.asarray(ref, dtype="float64")
    scale = np.linalg.norm(ref - start)
    if scale < 1e-3:  # only then can it be within 1e-12 of the tensor's size (the test's are below 1e9)
        size = max(np.linalg.norm(start), 1.0)
        scale = size if scale <= 1e-12 * size else scale
    return float(np.linalg.norm(own - ref) / scale)  # (own - start) - (ref - start)


def flat_optimizer_state(optimizer_state, template):
    """{"optimizer/<key>/<name>": array} of an optimizer state, zeros where it has none (a fresh optimizer)
    for the entries of `template` (the reference's after the step)."""
    out = {}
    for key, values in template.items():
        for name, value in values.items():
            if name != "step":
                have = optimizer_state.get(key, {}).get(name)
                out[f"optimizer/{key}/{name}"] = np.zeros_like(value) if have is None else have
    return out


def step_errors(start, optimizer_start, loss, own, own_optimizer, ref_loss, ref, ref_optimizer, groups=GROUPS):
    """{quantity: error} of one step, for the quantities of `groups` (all by default): the loss's relative error,
    every tensor's update error (update_error), the optimizer state's (against the reference's state after the
    step, from the one it started from)."""
    errors = {"loss": abs(loss - ref_loss) / abs(ref_loss)} if "loss" in groups else {}
    for key, value in start.items():
        if group(key) in groups:
            errors[key] = update_error(value, own[key], ref[key])
    if "optimizer" in groups:
        ref_flat = flat_optimizer_state(ref_optimizer, ref_optimizer)
        start_flat = flat_optimizer_state(optimizer_start, ref_optimizer)
        own_flat = flat_optimizer_state(own_optimizer, ref_optimizer)
        for key, value in ref_flat.items():
            errors[key] = update_error(start_flat[key], own_flat[key], value)
    return errors


# ---------------------------------------------------------------- mutations

@contextlib.contextmanager
def _patched(owner, name, value):
    """`owner.name` set to `value` for the block (an attribute of the owner's own, or a patched instance's)."""
    own = name in vars(owner)
    original = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def _no_2t_scale(module):
    original = moco_v3_module.contrastive_loss

    def loss_without_2t(q, k, T):
        loss, logits, labels = original(q, k, T)
        return loss / (2 * T), logits, labels
    return _patched(moco_v3_module, "contrastive_loss", loss_without_2t)


def _m_schedule_off(module):
    return _patched(module, "momentum_at", lambda progress: module.m)


def _predictor_on_momentum_branch(module):
    encoder = module.momentum_encoder
    forward = encoder.forward
    return _patched(encoder, "forward", lambda x: module.predictor(forward(x)))


def _lars_adapts_1d(module):
    """moco/optimizer.py's weight decay and trust ratio applied to 1-D parameters too (BatchNorm's, biases):
    their gradient is replaced by the adapted one before ppmoco's update, which then leaves it as it is."""
    original = lars_module.LARS._append_optimize_op

    def adapted(self, block, param_and_grad):
        group = param_and_grad if isinstance(param_and_grad, dict) else None
        param, grad = group["params"] if group else param_and_grad
        if param.ndim == 1:
            wd = (group or {}).get("weight_decay", self._group_defaults["weight_decay"])
            d = grad + wd * param
            p_norm, d_norm = paddle.linalg.norm(param), paddle.linalg.norm(d)
            one = paddle.ones_like(p_norm)
            q = paddle.where(p_norm > 0, paddle.where(d_norm > 0, 0.001 * p_norm / d_norm, one), one)
            grad = d * q
            param_and_grad = dict(group, params=(param, grad)) if group else (param, grad)
        return original(self, block, param_and_grad)
    return _patched(lars_module.LARS, "_append_optimize_op", adapted)


def _keys_not_gathered(module):
    """Each process's loss over its own keys only (concat_all_gather left out, labels those of one process)."""
    stack = contextlib.ExitStack()
    stack.enter_context(_patched(moco_v3_module, "concat_all_gather", lambda t: t))
    stack.enter_context(_patched(moco_v3_module, "rank", lambda: 0))
    return stack


def _labels_not_offset(module):
    """Every process's keys gathered, but each process's positives taken at rank 0's indices."""
    return _patched(moco_v3_module, "rank", lambda: 0)


MUTATIONS = {
    "no_2T_scale": _no_2t_scale,
    "m_schedule_off": _m_schedule_off,
    "predictor_on_momentum_branch": _predictor_on_momentum_branch,
    "lars_adapts_1d_parameters": _lars_adapts_1d,
    "keys_not_gathered": _keys_not_gathered,
    "labels_not_offset": _labels_not_offset,
}


# ---------------------------------------------------------------- the two-process worker

def _digest(array):
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def _load_npz(path, prefix):
    data = np.load(path)
    return {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}


def _nested(flat):
    """{"key/name": array} -> {key: {name: array}} (optimizer states as np.savez holds them)."""
    out = {}
    for k, v in flat.items():
        key, name = k.rsplit("/", 1)
        out.setdefault(key, {})[name] = v.item() if name == "step" else v
    return out


def main(folder):
    import paddle.distributed as dist

    dist.init_parallel_env()
    rank, ranks = dist.get_rank(), dist.get_world_size()
    with open(os.path.join(folder, "setup.json"), encoding="utf-8") as f:
        spec = json.load(f)
    setup = Setup(**spec["setup"])
    half = setup.batch // ranks
    results = {}
    for candidate in [None, *spec["mutations"]]:
        runner = PpmocoRunner(setup, spec["conv"])
        steps = []
        for i in range(setup.steps):
            given = os.path.join(folder, f"step{i}.npz")
            start, optimizer_start = _load_npz(given, "state/"), _nested(_load_npz(given, "optimizer/"))
            views = [_load_npz(given, "view/")[str(v)] for v in (0, 1)]
            runner.load(start, optimizer_start)
            loss = runner.step([v[rank * half:(rank + 1) * half] for v in views], i, candidate)
            own = runner.state()
            truth = os.path.join(folder, f"truth{i}.npz")
            ref, ref_optimizer = _load_npz(truth, "state/"), _nested(_load_npz(truth, "optimizer/"))
            ref.update(_load_npz(truth, f"rank{rank}/"))  # this rank's BatchNorm statistics
            ref_loss = float(np.load(truth)["loss"][rank])
            errors = step_errors(start, optimizer_start, loss, own, runner.optimizer_state(), ref_loss, ref,
                                 ref_optimizer)
            shared = {k: _digest(v) for k, v in own.items() if group(k) != "statistics"}
            shared.update({k: _digest(v) for k, v in flat_optimizer_state(runner.optimizer_state(),
                                                                          ref_optimizer).items()})
            steps.append({"errors": errors, "digests": shared})
        results[candidate or "ppmoco"] = steps
    with open(os.path.join(folder, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
