"""MoCo v3's training step in PyTorch, written for the tests from facebookresearch/moco-v3 (`moco/builder.py`,
`moco/optimizer.py`, `vits.py`, `main_moco.py`); it imports nothing from ppmoco.

An independent reference for ppmoco's MoCoV3 step (tests/engine/test_mocov3_reference.py):
- the networks and builder.py's MoCo are tools/torch_reference.py's, the PyTorch step tools/benchmark.py
  measures (`TorchMoCoV3`, `backbone_factory`, `build_mlp`): torchvision's ResNet (`zero_init_residual=True`,
  as main_moco.py builds it; its `fc` replaced by the projector) and timm's VisionTransformer with vits.py's
  settings (patch 16, LayerNorm eps 1e-6, qkv bias, the fixed 2-D sin-cos position embedding as a frozen
  parameter, `stop_grad_conv1`; its `head` replaced by the projector); `_build_mlp` (Linear without bias,
  BatchNorm1d + ReLU between, an affine-free last BatchNorm where `last_bn`), 2-layer projector and predictor
  without last BatchNorm on a ResNet, 3-layer projector and a predictor with one on a ViT; the momentum
  encoder (backbone + projector) averaged over its parameters (not its buffers) after the queries and before
  the keys; the contrastive loss against every process's keys with labels offset by rank x per-process batch,
  times 2T; the symmetric sum ctr(q1, k2) + ctr(q2, k1);
- moco/optimizer.py's LARS (tools/torch_reference.py's: weight decay and the trust ratio on parameters of more
  than one dimension only), or torch.optim.AdamW's update (`AdamW`, written out so that the powers of the betas
  in its bias corrections can follow another framework's convention) over `model.parameters()`, as
  main_moco.py builds them;
- main_moco.py's per-iteration schedules (`adjust_learning_rate`: linear warmup, then a half cosine over
  the epochs after it; `adjust_moco_momentum`), given here as functions of the fractional epoch.

Several processes (DistributedDataParallel without SyncBatchNorm: ppmoco's CPU training) are run in one:
`step(..., ranks=R)` splits the batch into R equal chunks, each "rank" normalises its chunk with its own
BatchNorm running statistics (kept apart between steps, `statistics(rank)`), the keys of all ranks are
concatenated in rank order (concat_all_gather), rank r's labels are offset by r x N, and the gradient is
that of the mean of the ranks' losses (DDP's average). With R = 1 it is builder.py on one GPU.

One framework convention is Paddle's, not PyTorch's: BatchNorm's running variance is updated with the
biased batch variance (PyTorch uses the unbiased one; docs/differences.md). `paddle_running_variance` converts
every BatchNorm of the model to do that, so every other difference stays visible. (The test also gives AdamW
Paddle's float32 betas and float32 beta powers: tests/engine/dist_mocov3_worker.py Setup.reference.) Every ReLU is
made the same function not in place, so that a test can record or flip the online network's ReLU inputs
(`step(..., relu=)`).

Weights and states come from and go to ppmoco's state-dict keys and layouts (`ppmoco_key`, Linear weights
transposed: Paddle stores [in, out], PyTorch [out, in]), as numpy arrays.
"""
import math
import os
import sys

import numpy as np

from optional_deps import timm_vision_transformer, torch_or_skip, torchvision_or_skip

torch = torch_or_skip()
nn, F = torch.nn, torch.nn.functional
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
# sincos_position_embedding: test_mocov3_reference.py checks ppmoco's against it, imported from here
from torch_reference import LARS, TorchMoCoV3, backbone_factory, sincos_position_embedding  # noqa: E402, F401

# ---------------------------------------------------------------- main_moco.py's schedules

def adjust_learning_rate(base_lr, epoch, warmup_epochs, epochs):
    """main_moco.py: linear warmup from 0, then a half cosine over the remaining epochs (`epoch` fractional)."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def adjust_moco_momentum(base_m, epoch, epochs):
    """main_moco.py's --moco-m-cos: m rises from base_m to 1 along a half cosine (`epoch` fractional)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - base_m)


# ---------------------------------------------------------------- Paddle's BatchNorm convention, the ReLU tap

class _PaddleRunningVariance:
    """A torch BatchNorm whose running variance follows Paddle's convention (biased batch variance)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        with torch.no_grad():
            mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class BatchNorm1d(_PaddleRunningVariance, nn.BatchNorm1d):
    pass


class BatchNorm2d(_PaddleRunningVariance, nn.BatchNorm2d):
    pass


_relu_tap = None  # while MoCoV3Reference.step computes the queries: its `relu` argument


class ReLU(nn.ReLU):
    """nn.ReLU (not in place), or the online network's ReLU tap (MoCoV3Reference.step's `relu`)."""

    def forward(self, x):
        return F.relu(x) if _relu_tap is None else _relu_tap(x)


def paddle_running_variance(model):
    """Every BatchNorm1d/2d of `model` with Paddle's running variance (same parameters and buffers), and every
    ReLU one that can be tapped (the same function)."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = BatchNorm2d
        elif type(module) is nn.BatchNorm1d:
            module.__class__ = BatchNorm1d
        elif type(module) is nn.ReLU:
            module.__class__ = ReLU
            module.inplace = False
    return model


# ---------------------------------------------------------------- torch.optim.AdamW

class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (its single-tensor path: decoupled weight decay, then the bias-corrected
    Adam step; no amsgrad), with the bias corrections' beta powers given by `beta_power(beta, step)`: by
    default beta ** step in double, as torch computes them (tests/engine/test_mocov3_reference.py checks the
    two optimizers equal); a test may give another framework's convention."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, beta_power=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.beta_power = beta_power or (lambda beta, step: beta ** step)

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            beta1, beta2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                step = float(state["step"])
                p.mul_(1 - g["lr"] * g["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                bias_correction1 = 1 - self.beta_power(beta1, step)
                bias_correction2 = 1 - self.beta_power(beta2, step)
                denom = (state["exp_avg_sq"].sqrt() / bias_correction2 ** 0.5).add_(g["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-g["lr"] / bias_correction1)


# ---------------------------------------------------------------- ppmoco's keys

def ppmoco_key(torch_key, vit):
    """This reference's state-dict key -> ppmoco MoCoV3's (`base_encoder.fc.0.weight` ->
    `base_encoder.head.0.weight`, `base_encoder.layer1.0.bn1.running_var` ->
    `base_encoder.backbone.layer1.0.bn1._variance`)."""
    key = torch_key.replace(".running_mean", "._mean").replace(".running_var", "._variance")
    for encoder in ("base_encoder.", "momentum_encoder."):
        if key.startswith(encoder):
            rest = key[len(encoder):]
            head = "head." if vit else "fc."
            return encoder + ("head." + rest[len(head):] if rest.startswith(head) else "backbone." + rest)
    return key


def _is_linear_weight(key, value):
    return key.endswith(".weight") and value.ndim == 2


def _from_paddle_layout(key, value):
    """A torch view of a Paddle-layout array in this reference's layout (no copy)."""
    tensor = torch.from_numpy(np.asarray(value))
    return tensor.t() if _is_linear_weight(key, value) else tensor


def _to_paddle_numpy(key, tensor, copy=True):
    """A torch tensor as numpy in Paddle's layout: a copy (made by torch), or with `copy` False a view (valid
    until the tensor changes)."""
    tensor = tensor.detach()
    if _is_linear_weight(key, tensor):
        tensor = tensor.t()
        return (tensor.contiguous() if copy else tensor).numpy()
    return (tensor.clone() if copy else tensor).numpy()


class MoCoV3Reference:
    """builder.py's model with main_moco.py's optimizer, loaded from and read back as ppmoco MoCoV3 states."""

    def __init__(self, arch, image_size=224, dim=256, mlp_dim=4096, T=1.0, optimizer="LARS", weight_decay=1e-6,
                 momentum=0.9, trust_coefficient=0.001, betas=(0.9, 0.999), eps=1e-8, beta_power=None,
                 stop_grad_conv1=False, dtype=torch.float64):
        self.dtype = dtype
        if arch == "vit_small":  # a skip where timm or torchvision is missing (optional_deps)
            timm_vision_transformer()
        else:
            torchvision_or_skip()
        model = TorchMoCoV3(backbone_factory(arch, image_size, stop_grad_conv1), dim, mlp_dim, T)
        self.model = paddle_running_variance(model).to(dtype)
        self.model.train()
        vit = self.model.vit
        self.keys = {k: ppmoco_key(k, vit) for k in self.model.state_dict() if not k.endswith("num_batches_tracked")}
        self.names = {v: k for k, v in self.keys.items()}
        self.params = dict(self.model.named_parameters())
        if optimizer == "LARS":
            self.optimizer = LARS(self.model.parameters(), 0.0, weight_decay=weight_decay, momentum=momentum,
                                  trust_coefficient=trust_coefficient)
        else:
            self.optimizer = AdamW(self.model.parameters(), 0.0, betas=betas, eps=eps, weight_decay=weight_decay,
                                   beta_power=beta_power)
        self._rank_buffers = None

    # ---- states

    def load(self, state, optimizer_state=None):
        """Every tensor from a ppmoco MoCoV3 state dict ({key: array}; its keys must be exactly this model's)
        and the optimizer's state ({ppmoco parameter key: {name: array}}, optimizer_state()'s form; none: fresh)."""
        assert sorted(state) == sorted(self.names), (set(state) ^ set(self.names))
        own = {self.names[k]: _from_paddle_layout(k, v) for k, v in state.items()}
        missing, unexpected = self.model.load_state_dict(own, strict=False)  # copies, casting to self.dtype
        assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
        self.optimizer.state.clear()
        for key, values in (optimizer_state or {}).items():
            self.optimizer.state[self.params[self.names[key]]] = {
                k: torch.tensor(v, dtype=torch.float32) if k == "step" else
                _from_paddle_layout(key, v).to(self.dtype, copy=True).contiguous() for k, v in values.items()}
        self._rank_buffers = None

    def state(self, copy=True):
        """Every tensor as a ppmoco MoCoV3 state dict (rank 0's BatchNorm statistics); with `copy` False, views
        of the live tensors (valid until the next step or load)."""
        return {self.keys[k]: _to_paddle_numpy(k, v, copy) for k, v in self.model.state_dict().items()
                if k in self.keys}

    def statistics(self, rank):
        """BatchNorm running statistics of rank `rank` after the last step, as ppmoco keys."""
        buffers = self._rank_buffers[rank] if self._rank_buffers else self._buffers()
        return {self.keys[k]: v.clone().numpy() for k, v in buffers.items() if k in self.keys}

    def optimizer_state(self, copy=True):
        """{ppmoco parameter key: {"mu"} (LARS) or {"exp_avg", "exp_avg_sq", "step"} (AdamW)}, Paddle's layout
        (views with `copy` False, as state())."""
        out = {}
        for name, p in self.params.items():
            if p in self.optimizer.state and self.optimizer.state[p]:
                out[self.keys[name]] = {k: float(v) if k == "step" else _to_paddle_numpy(name, v, copy)
                                        for k, v in self.optimizer.state[p].items()}
        return out

    def _buffers(self):
        return {k: v.detach().clone() for k, v in self.model.named_buffers() if not k.endswith("num_batches_tracked")}

    def _set_buffers(self, buffers):
        own = dict(self.model.named_buffers())
        with torch.no_grad():
            for k, v in buffers.items():
                own[k].copy_(v)

    # ---- the step

    def step(self, x1, x2, lr, m, ranks=1, relu=None):
        """One iteration of main_moco.py's train() at learning rate `lr` and momentum `m` on numpy views
        [B, C, H, W], run as `ranks` processes of B / ranks images each: [loss of each rank]. `relu`, if given,
        computes every ReLU of the online network's forward (base encoder and predictor; called with each
        input in order, e.g. to record it or to flip a unit's mask; tests/engine/test_mocov3_reference.py)."""
        global _relu_tap
        model = self.model
        x1, x2 = (torch.tensor(x, dtype=self.dtype).chunk(ranks) for x in (x1, x2))
        start = self._buffers()
        buffers = [dict(start) for _ in range(ranks)] if self._rank_buffers is None else self._rank_buffers
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        q1, q2 = [], []
        _relu_tap = relu
        try:
            for r in range(ranks):  # each process: its queries, through its own BatchNorm statistics
                self._set_buffers(buffers[r])
                q1.append(model.predictor(model.base_encoder(x1[r])))
                q2.append(model.predictor(model.base_encoder(x2[r])))
                buffers[r] = self._buffers()
        finally:
            _relu_tap = None
        with torch.no_grad():
            model.update_momentum_encoder(m)  # the same on every process
            k1, k2 = [], []
            for r in range(ranks):
                self._set_buffers(buffers[r])
                k1.append(model.momentum_encoder(x1[r]))
                k2.append(model.momentum_encoder(x2[r]))
                buffers[r] = self._buffers()
            # concat_all_gather: rank order; contrastive_loss normalises row by row, as builder.py before the gather
            k1_all, k2_all = torch.cat(k1), torch.cat(k2)
        losses = [model.contrastive_loss(q1[r], k2_all, r) + model.contrastive_loss(q2[r], k1_all, r)
                  for r in range(ranks)]
        self.optimizer.zero_grad()
        (sum(losses) / ranks).backward()  # DDP averages the processes' gradients
        self.optimizer.step()
        self._set_buffers(buffers[0])
        self._rank_buffers = buffers if ranks > 1 else None
        return [loss.item() for loss in losses]
