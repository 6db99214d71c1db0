"""ppmoco's MoCo v3 step equals an independent PyTorch step written from facebookresearch/moco-v3.

The reference (tests/torch_mocov3_reference.py, importing nothing from ppmoco) is builder.py's MoCo_ResNet /
MoCo_ViT on torchvision's ResNet (zero_init_residual) and timm's VisionTransformer (vits.py's settings), with
moco/optimizer.py's LARS or torch's AdamW and main_moco.py's per-iteration learning rate and momentum.
ppmoco's side (tests/engine/dist_mocov3_worker.py) is MoCoV3 with the step build_train_step builds (the real
optimizer, Engine.conv's convolutions), driven as the Engine drives it: ppmoco's CosineDecay schedule
(warmup, cosine_after_warmup, per step) set before each step, the step given its Progress. Both start from
ppmoco's initial weights; the views are random images. The compared steps are iterations 1 and 2 of a run of
4 epochs of 2 iterations with 1 warmup epoch: the learning rate is 0.5x then 1x the base, m 0.99038 then
0.99146 (m_cos), so both schedules move. Setups, at the published head sizes, batch 8:
- r50_lars_64px: ResNet-50 (projector 2048-4096-256, predictor 256-4096-256), moco-v3's ResNet recipe (LARS,
  weight decay 1e-6, T 1, base lr 2.4 = 0.6 x 1024 / 256), 64 px, ppmoco's oneDNN convolutions;
- r18_lars_64px: the same on ResNet-18 (projector 512-4096-256), oneDNN's and Paddle's convolutions; the
  one-process mutations run on it;
- vit_s16_adamw_32px: ViT-S/16 (projector 384-4096-4096-256, predictor 256-4096-256, both with their last
  BatchNorm), moco-v3's ViT recipe (AdamW, weight decay 0.1, T 0.2, base lr 6e-4 = 1.5e-4 x 1024 / 256,
  stop_grad_conv1), 32 px (a 2x2 grid: the step compared does not depend on the grid, the position
  embedding being loaded into the reference; test_the_position_embedding_is_vits_pys checks ppmoco's). The
  float64 reference first runs iteration 0 unrecorded (learning rate 0 in the warmup, as in a run), so that
  AdamW's moments hold a gradient when the comparison starts: at a fresh AdamW's first step the update
  g / (|g| + eps) turns the float32 rounding of near-zero gradient entries into whole updates, a per-tensor
  spread that differs from framework to framework by up to 18x. Paddle's and oneDNN's convolutions gave identical
  steps there (the patch projection is frozen), so it runs with oneDNN's only.
- two processes (test_two_processes_*, slow): ResNet-18 + LARS at 64 px, 4 images per process, oneDNN's
  convolutions, under paddle.distributed.launch (gloo, CPU), against the reference run as 2 processes (keys of
  both gathered in rank order, rank-offset labels, the mean of the two losses' gradients, each process its own
  BatchNorm statistics: ppmoco has no SyncBatchNorm on CPU). Every parameter, momentum-encoder tensor and
  optimizer state must be bit-identical on both ranks; each rank's loss and statistics are compared with the
  reference's for that rank.

Teacher-forced, as tests/moco_equivalence.py explains: each step starts every candidate (ppmoco, float32
PyTorch) from the float64 reference's own state, module and optimizer (LARS's mu, AdamW's moments and step).
Compared per quantity (dist_mocov3_worker.step_errors: the relative error of the step's change, the loss's
relative error), each within FACTOR x float32 PyTorch's error for that same quantity at that step + SLACK for
its group:
- loss;
- online: every base-encoder (backbone + projector) and predictor parameter after the optimizer step;
- statistics: every BatchNorm running mean and variance (backbone, projector, predictor, momentum encoder);
- momentum: the momentum encoder's parameters after its update;
- optimizer: LARS's mu or AdamW's two moments after the step.
Where the float64 change is within its own rounding of zero the error is taken relative to the tensor's
size (dist_mocov3_worker.update_error): a frozen tensor, the momentum encoder at step 1 (still the base
encoder's copy), the running mean of the predictor's input (which the projector's last BatchNorm centres).

Conventions the reference takes from Paddle, so that every other difference stays visible: BatchNorm's
running variance from the biased batch variance (docs/differences.md); AdamW's betas in float32 (0.999 is
0.99900001287, so 1 - beta2 is 1.3e-5 off) and its beta powers kept in float32 accumulators
(dist_mocov3_worker.paddle_beta_power: 1 - beta2 ** 2 = 0.002 keeps 4 digits, moving the first steps' updates
by ~1e-5; with torch's double powers ppmoco's ViT updates were a diffuse 1e-5 off, own/float32 up to 3.7).

ReLU flips. Float32 turns the sign of a ReLU input that float64 puts within its rounding of zero now and then;
the unit's gradient then passes or not, and every tensor upstream moves by up to a few percent of its update
(tests/moco_equivalence.py). Here float32 PyTorch's step is compared with the float64 step flipped at each unit
whose sign float32 PyTorch does not share (its spread is then rounding alone: in the ViT, one flipped unit of
the predictor's ReLU put float32 PyTorch 2% off everywhere upstream at step 2); a ppmoco step that fails the
bounds is compared with the float64 step flipped at ppmoco's own sign differences that float32 PyTorch's error
on that ReLU input covers. Measured: float32 PyTorch flips 2, 0 (r18), 2, 1 (r50) and 0, 1 (ViT) units; ppmoco
needs it on ResNet-50 (oneDNN: 0, 2 units; Paddle's convolutions, measured apart: 10, 6) and on ResNet-18 with
Paddle's convolutions at a third step (1 unit of layer1.0's output ReLU: layer1.1.conv1 3e-4 off, float32 1e-5).

Measured (the three setups, all their convolutions and Paddle's on ResNet-50, 2 steps; p50 / p90 / p99 / max of
each quantity's error; own/float32 the ratio where float32's error is not 0):
- loss (10): ppmoco 2.4e-8 / 8.2e-8 / 8.2e-8 / 8.2e-8, float32 8.7e-8 to 1.7e-7; own/float32 0.63 to 1.
- online (1262 tensors): ppmoco 5.2e-6 / 7.0e-5 / 1.4e-2 / 6.4e7, float32 6.0e-6 / 8.8e-5 / 2.0e-2 / 6.7e7;
  own/float32 p50 0.98, p90 1.0, p99 1.2, max 1.5; no slack needed over 4x float32 (the closest: 0.37 of its
  bound). The tail is the ViT's zero-gradient directions, float32 noise in both frameworks that AdamW
  normalises into updates: the final LayerNorm's bias (a shift the projector's BatchNorm removes; 6e7
  relative to a float64 update of ~1e-12) and the key third of each qkv bias (softmax ignores a shift of
  every key's logit; 1e-2 to 4e-2).
- statistics (1280): ppmoco 3.3e-7 / 5.9e-7 / 1.1e-6 / 1.5e-6, float32 3.0e-7 / 7.6e-7 / 1.3e-6 / 1.9e-6;
  own/float32 up to 6.1 where float32 is at 4e-8; slack needed over 4x float32: 8.4e-8.
- momentum (1222): ppmoco equal to float32 PyTorch for every tensor (own/float32 exactly 1; both average in
  float32 the same way); p50 3.7e-8, max 2.4e-2 (the update (1 - m)(base - momentum) cancels against the
  momentum encoder's value).
- optimizer (1572): ppmoco 3.9e-6 / 4.8e-6 / 5.7e-6 / 8.5e-6, float32 4.6e-6 / 5.8e-6 / 2.6e-5 / 1.5e-4;
  own/float32 up to 1.9; no slack needed.
- two processes (2 steps x 2 ranks): loss 3.9e-8 to 1.1e-7, float32 3.1e-8 to 4.6e-8 (own/float32 up to 26
  where float32 is at 4e-9; slack needed over 4x float32: 9.4e-8); online 2.4e-5 / 3.5e-5 / 6.5e-5 / 6.6e-5,
  own/float32 at most 1.1; statistics own/float32 up to 5.7 (slack needed 7e-8); momentum equal to float32's;
  optimizer own/float32 at most 1.1; every shared tensor bit-identical on both ranks.
Bounds (FACTOR, SLACK): 4x and 1e-6 for the loss (10x the needed slack), online and optimizer (none needed;
1e-6 lets a quantity float32 PyTorch gets exactly right be off by float32 rounding), 4x and 2e-7 for statistics
(2.4x the needed slack), 2x and 1e-6 for momentum (measured: 1x and 0).

Found by this test: ppmoco's LARS took ||p|| and ||g + wd p|| with paddle.linalg.norm, whose float32 CPU sum
is 2.3e-4 off at 2.1M elements (ResNet-18's 512x4096 projector weight) and 2.2e-3 at 8.4M (ResNet-50's
2048x4096), against 3e-8 for paddle.sqrt(paddle.sum(x * x)) and 8e-6 / 7e-5 for torch.norm; ResNet-50's
base_encoder.head.0.weight update was 3.3e-3 off where float32 PyTorch is at 1.6e-4 (bound 6.3e-4). The
ResNet tests, one- and two-process, failed on it; ppmoco/engine/lars.py now sums x * x.

Mutations, each failing its group (test_each_mutation_fails, test_each_two_process_mutation_fails; measured):
- no_2T_scale (contrastive_loss without x 2T; T = 1 here, so the loss halves): loss 0.5 off, bound 1.3e-6;
- m_schedule_off (m constant under m_cos): the momentum encoder's update at step 2 17% off (bound 8.8e-3 on
  conv1.weight; at step 1 the encoders are equal, so nothing shows);
- predictor_on_momentum_branch (keys through the predictor too): loss 6.9e-3 and 2.4e-2 off, bound 1.3e-6;
- lars_adapts_1d_parameters (weight decay and the trust ratio on biases and BatchNorm parameters too):
  BatchNorm updates up to 0.96 off (bn1.weight, bound 1.8e-5);
- keys_not_gathered (2 processes: each process's loss over its own keys, its own labels): loss 0.33 off,
  every update ~2%;
- labels_not_offset (2 processes: keys gathered, rank 1's positives at rank 0's indices): updates ~100% off.

Runtime: the file (one pytest process, 2 cores shared with other jobs at a load of ~1 to 1.6) 148 s: ResNet-50
38 s, ResNet-18 with the mutations 33 s (all that runs with -m "not slow", besides the checks of the reference),
ViT-S 33 s, two processes 41 s. At a load of 3 to 8 the same took 7 minutes.
"""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dist_mocov3_worker import GROUPS, PpmocoRunner, Setup, group, step_errors
from moco_equivalence import FlippedRelu, ReluInputs
from optional_deps import torch_or_skip

torch_or_skip()
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

SETUPS = {
    # moco-v3's ResNet recipe (LARS, weight decay 1e-6, T 1, m 0.99 rising along a cosine) on ResNet-50 with the
    # real heads: projector 2048-4096-256, predictor 256-4096-256; 64 px (2x2 maps in the last stage), batch 8.
    "r50_lars_64px": Setup(arch="resnet50", steps=2),
    "r18_lars_64px": Setup(steps=2),  # projector 512-4096-256
    # moco-v3's ViT-S recipe (AdamW, weight decay 0.1, T 0.2, stop_grad_conv1) on ViT-S/16 at 32 px (a 2x2 grid
    # of patches) with the real heads: projector 384-4096-4096-256, predictor 256-4096-256, both with last BN;
    # iteration 0 (learning rate 0) run by the reference alone, so that AdamW's moments are not fresh.
    "vit_s16_adamw_32px": Setup(arch="vit_small", px=32, T=0.2, optimizer="AdamW", lr=6e-4, weight_decay=0.1,
                                stop_grad_conv1=True, steps=2, unrecorded=1),
}
CONVS = {"r50_lars_64px": ("onednn",), "r18_lars_64px": ("onednn", "paddle"), "vit_s16_adamw_32px": ("onednn",)}
MUTATION_SETUP = "r18_lars_64px"
# Each must fail the bounds in the group named (measured: see the module docstring).
ONE_PROCESS_MUTATIONS = {
    "no_2T_scale": "loss",
    "m_schedule_off": "momentum",
    "predictor_on_momentum_branch": "loss",
    "lars_adapts_1d_parameters": "online",
}

# Every quantity's error (dist_mocov3_worker.step_errors) within FACTOR x float32 PyTorch's error for that
# same quantity at that step + SLACK for its group (measured: see the module docstring).
FACTOR = {"loss": 4.0, "online": 4.0, "statistics": 4.0, "momentum": 2.0, "optimizer": 4.0}
SLACK = {"loss": 1e-6, "online": 1e-6, "statistics": 2e-7, "momentum": 1e-6, "optimizer": 1e-6}


def violations(own, f32):
    """Every quantity of one step (step_errors; "flips" aside) outside FACTOR x float32's error for it + SLACK."""
    out = []
    for key, error in own.items():
        if key == "flips":
            continue
        kind = group(key)
        bound = FACTOR[kind] * f32[key] + SLACK[kind]
        if not error <= bound:
            out.append(f"{kind} {key}: {error:.3g} > {bound:.3g} (float32: {f32[key]:.3g})")
    return out


def numpy_state(module):
    return {k: v.numpy() for k, v in module.state_dict().items()}  # numpy() copies


def relu_errors(inputs, truth):
    """Per ReLU input of a float32 step: its largest error from float64's (`truth`)."""
    assert [x.shape for x in inputs] == [t.shape for t in truth], "the ReLU calls differ from the reference's"
    return [float(np.abs(x - t).max()) for x, t in zip(inputs, truth)]


def flips(inputs, truth, errors=None):
    """{ReLU call: flat indices} of the units whose sign differs from float64's (`truth`); with `errors` (float32
    PyTorch's relu_errors), only those where float64's value lies within float32 PyTorch's error on that input."""
    assert [x.shape for x in inputs] == [t.shape for t in truth], "the ReLU calls differ from the reference's"
    out = {}
    for call, (x, t) in enumerate(zip(inputs, truth)):
        differ = (x > 0) != (t > 0)
        if errors is not None:
            differ &= np.abs(t) <= errors[call]
        if differ.any():
            out[call] = np.flatnonzero(differ)
    return out


class ReferenceRunner:
    """The PyTorch reference in float32 (its spread), run as ppmoco's runner is: loaded, stepped, read."""

    def __init__(self, setup, ranks=1):
        self.setup, self.ranks, self.ref = setup, ranks, setup.reference("float32")
        self.relu_inputs = []

    def load(self, state, optimizer_state):
        self.ref.load(state, optimizer_state)

    def step(self, views, i, mutation=None):
        recorder = ReluInputs()
        self.losses = self.ref.step(*views, *self.setup.reference_schedule(i), ranks=self.ranks, relu=recorder)
        self.relu_inputs = recorder.inputs
        return self.losses[0]

    def state(self):
        return self.ref.state(copy=False)  # compared before the next step

    def optimizer_state(self):
        return self.ref.optimizer_state(copy=False)


def teacher_forced(setup, candidates):
    """{candidate: [{quantity: error} per step]}: every candidate ("float32": the PyTorch reference in float32,
    which must come first; a convolution, "onednn" or "paddle": ppmoco's step with it; "mutation:<name>":
    ppmoco's (Paddle's convolutions) with a MUTATIONS fault) run each step from the float64 reference's own
    state, on the same views, at the step's learning rate and momentum.

    ReLU flips (the module docstring): float32 PyTorch's step is compared with the float64 step flipped at every
    unit whose sign it does not share; a ppmoco step (not a mutation's) that fails the bounds against the plain
    float64 step, with the float64 step flipped at ppmoco's flips that float32 PyTorch's error on that ReLU input
    covers. "flips" counts the units of the float64 step a result is compared with."""
    assert candidates[0] == "float32"
    truth, flipped = setup.reference("float64"), None
    initial = numpy_state(setup.module())
    truth.load(initial)  # the same tensors by name and shape, or it fails here
    for i in range(-setup.unrecorded, 0):
        truth.step(*setup.views(i), *setup.reference_schedule(i))
    runners = {}
    for name in candidates:
        if name == "float32":
            runners[name] = (ReferenceRunner(setup), None)
        elif name.startswith("mutation:"):
            runners[name] = (PpmocoRunner(setup, "paddle"), name[len("mutation:"):])
        else:
            runners[name] = (PpmocoRunner(setup, name), None)
    out = {name: [] for name in candidates}
    ref, ref_optimizer = truth.state(), truth.optimizer_state()
    for i in range(setup.steps):
        start, optimizer_start = ref, ref_optimizer
        views, schedule = setup.views(i), setup.reference_schedule(i)
        recorder = ReluInputs()
        ref_loss = truth.step(*views, *schedule, relu=recorder)[0]
        ref, ref_optimizer = truth.state(), truth.optimizer_state()
        flipped_steps = {}

        def against_flipped(units, loss, own, own_optimizer, groups):
            """step_errors against the float64 step flipped at `units` (computed once per set of units)."""
            nonlocal flipped
            key = tuple((call, tuple(u)) for call, u in sorted(units.items()))
            if key not in flipped_steps:
                flipped = flipped or setup.reference("float64")
                flipped.load(start, optimizer_start)
                flipped_loss = flipped.step(*views, *schedule, relu=FlippedRelu(units))[0]
                flipped_steps.clear()  # one float64 state at a time: views of the flipped reference's
                flipped_steps[key] = (flipped_loss, flipped.state(copy=False), flipped.optimizer_state(copy=False))
            flipped_loss, state, optimizer_state = flipped_steps[key]
            return dict(step_errors(start, optimizer_start, loss, own, own_optimizer, flipped_loss, state,
                                    optimizer_state, groups), flips=sum(len(u) for u in units.values()))

        for name, (runner, mutation) in runners.items():
            runner.load(start, optimizer_start)
            loss = runner.step(views, i, mutation)
            own, own_optimizer = runner.state(), runner.optimizer_state()
            groups = (ONE_PROCESS_MUTATIONS[mutation],) if mutation else GROUPS  # a mutation: its group only
            errors = step_errors(start, optimizer_start, loss, own, own_optimizer, ref_loss, ref, ref_optimizer,
                                 groups)
            if name == "float32":
                relu = relu_errors(runner.relu_inputs, recorder.inputs)
                units = flips(runner.relu_inputs, recorder.inputs)
                if units:
                    errors = against_flipped(units, loss, own, own_optimizer, groups)
                spread = errors
            elif mutation is None and violations(errors, spread):
                units = flips(runner.relu_inputs, recorder.inputs, relu)
                if units:
                    errors = against_flipped(units, loss, own, own_optimizer, groups)
            out[name].append(errors)
    return out


_RUNS = {}


def runs(name):
    """teacher_forced() of setup `name` with float32, its convolutions and (MUTATION_SETUP) the mutations, once."""
    if name not in _RUNS:
        candidates = ["float32", *CONVS[name]]
        if name == MUTATION_SETUP:
            candidates += [f"mutation:{m}" for m in ONE_PROCESS_MUTATIONS]
        _RUNS[name] = teacher_forced(SETUPS[name], candidates)
    return _RUNS[name]


# ResNet-18 (which the mutations need anyway) also runs without the slow tests.
@pytest.mark.parametrize("name,conv", [
    pytest.param(name, conv, marks=() if name == MUTATION_SETUP else pytest.mark.slow)
    for name in SETUPS for conv in CONVS[name]])
def test_step_equals_the_pytorch_reference(name, conv):
    """Loss, every online parameter, BatchNorm statistic, momentum-encoder parameter and optimizer state after
    each step within the bounds (module docstring)."""
    result = runs(name)
    failed = [f"step {i + 1}: {v}" for i, (own, f32) in enumerate(zip(result[conv], result["float32"]))
              for v in violations(own, f32)]
    assert not failed, f"{name}, {conv} convolutions:\n" + "\n".join(failed)


@pytest.mark.parametrize("mutation", ONE_PROCESS_MUTATIONS)
def test_each_mutation_fails(mutation):
    """ppmoco with each fault of ONE_PROCESS_MUTATIONS (dist_mocov3_worker.MUTATIONS) patched in fails the bounds
    of the group named."""
    result = runs(MUTATION_SETUP)
    kind = ONE_PROCESS_MUTATIONS[mutation]
    failed = [v for own, f32 in zip(result[f"mutation:{mutation}"], result["float32"]) for v in violations(own, f32)]
    assert any(v.startswith(kind + " ") for v in failed), f"{mutation} passes the {kind} bounds: {failed[:5]}"


def test_the_references_adamw_is_torchs():
    """The reference's AdamW (written out for its beta powers) computes torch.optim.AdamW's steps."""
    from torch_mocov3_reference import AdamW, torch

    torch.manual_seed(0)
    mine = [torch.randn(5, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(4, dtype=torch.float64, requires_grad=True)]
    torchs = [p.detach().clone().requires_grad_() for p in mine]
    ours = AdamW(mine, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    theirs = torch.optim.AdamW(torchs, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in mine]
        for optimizer, tensors in ((ours, mine), (theirs, torchs)):
            for p, g in zip(tensors, grads):
                p.grad = g.clone()
            optimizer.step()
        for a, b in zip(mine, torchs):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_the_position_embedding_is_vits_pys():
    """ppmoco's fixed ViT position embedding (loaded into the reference with the other tensors) is the one
    vits.py builds (in float32: they differ by its rounding)."""
    from torch_mocov3_reference import sincos_position_embedding

    setup = SETUPS["vit_s16_adamw_32px"]
    pos = setup.module().base_encoder.backbone.pos_embed.numpy()
    np.testing.assert_allclose(pos, sincos_position_embedding(setup.px // 16, 384).numpy(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- two processes

TWO_PROCESS_SETUP = Setup(steps=2)  # ResNet-18 + LARS at 64 px, batch 8: 4 images per process
TWO_PROCESS_MUTATIONS = {"keys_not_gathered": "loss", "labels_not_offset": "loss"}


def _flat(optimizer_state):
    return {f"{key}/{name}": value for key, values in optimizer_state.items() for name, value in values.items()}


def two_process_reference(folder, setup):
    """The float64 reference run as 2 processes, each step from its own state (both processes' BatchNorm
    statistics restarting from it, as ppmoco's ranks are loaded); saves each step's start, views and result for
    the worker; returns float32 PyTorch's errors per step and rank."""
    truth, f32 = setup.reference("float64"), ReferenceRunner(setup, ranks=2)
    truth.load(numpy_state(setup.module()))
    spread = []
    ref, ref_optimizer = truth.state(), truth.optimizer_state()
    for i in range(setup.steps):
        start, optimizer_start = ref, ref_optimizer
        views = setup.views(i)
        truth.load(start, optimizer_start)  # both processes' BatchNorm statistics from rank 0's
        ref_losses = truth.step(*views, *setup.reference_schedule(i), ranks=2)
        ref, ref_optimizer = truth.state(), truth.optimizer_state()
        statistics = [truth.statistics(r) for r in (0, 1)]
        np.savez(folder / f"step{i}.npz", **{f"state/{k}": v for k, v in start.items()},
                 **{f"optimizer/{k}": v for k, v in _flat(optimizer_start).items()},
                 **{f"view/{v}": views[v] for v in (0, 1)})
        np.savez(folder / f"truth{i}.npz", loss=np.array(ref_losses), **{f"state/{k}": v for k, v in ref.items()},
                 **{f"optimizer/{k}": v for k, v in _flat(ref_optimizer).items()},
                 **{f"rank{r}/{k}": v for r in (0, 1) for k, v in statistics[r].items()})
        f32.load(start, optimizer_start)
        f32.step(views, i)
        own, own_optimizer = f32.state(), f32.optimizer_state()
        spread.append([step_errors(start, optimizer_start, f32.losses[r], dict(own, **f32.ref.statistics(r)),
                                   own_optimizer, ref_losses[r], dict(ref, **statistics[r]), ref_optimizer)
                       for r in (0, 1)])
    return spread


def run_two_processes(folder, setup, mutations):
    spread = two_process_reference(folder, setup)
    (folder / "setup.json").write_text(json.dumps({"setup": dataclasses.asdict(setup), "conv": "onednn",
                                                   "mutations": list(mutations)}))
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(folder / "logs"), os.path.join(ROOT, "tests", "engine", "dist_mocov3_worker.py"), str(folder)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text(errors="replace") for p in sorted((folder / "logs").glob("workerlog.*")))
    assert proc.returncode == 0, proc.stderr[-3000:] + logs[-5000:]
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    return spread, ranks


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return run_two_processes(tmp_path_factory.mktemp("mocov3_2proc"), TWO_PROCESS_SETUP, TWO_PROCESS_MUTATIONS)


@pytest.mark.slow
def test_two_processes_equal_the_pytorch_reference(two_processes):
    """Two ranks of 4 images each against the reference run as two processes (keys gathered in rank order,
    rank-offset labels, gradients averaged, each rank's own BatchNorm statistics): each rank's loss and
    statistics against the reference's for that rank, everything else equal on both ranks and to the
    reference's."""
    spread, ranks = two_processes
    failed = []
    for i, f32 in enumerate(spread):
        steps = [ranks[r]["ppmoco"][i] for r in (0, 1)]
        assert steps[0]["digests"] == steps[1]["digests"], f"step {i + 1}: the ranks' parameters differ"
        for r in (0, 1):
            failed += [f"step {i + 1}, rank {r}: {v}" for v in violations(steps[r]["errors"], f32[r])]
    assert not failed, "\n".join(failed)


@pytest.mark.slow
@pytest.mark.parametrize("mutation", TWO_PROCESS_MUTATIONS)
def test_each_two_process_mutation_fails(mutation, two_processes):
    """The same for the faults only two processes show: the keys not gathered, the labels not offset by rank."""
    spread, ranks = two_processes
    kind = TWO_PROCESS_MUTATIONS[mutation]
    failed = [v for r in (0, 1) for own, f32 in zip(ranks[r][mutation], spread)
              for v in violations(own["errors"], f32[r])]
    assert any(v.startswith(kind + " ") for v in failed), f"{mutation} passes the {kind} bounds: {failed[:5]}"


def test_every_group_has_its_bound():
    assert set(FACTOR) == set(SLACK) == set(GROUPS)
