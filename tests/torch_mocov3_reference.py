"""MoCo v3's training step in PyTorch, written for the tests from facebookresearch/moco-v3 (`moco/builder.py`,
`moco/optimizer.py`, `vits.py`, `main_moco.py`); it imports nothing from ppmoco.

An independent reference for ppmoco's MoCoV3 step (tests/engine/test_mocov3_reference.py):
- the networks are the reference's own classes: torchvision's ResNet (`zero_init_residual=True`, as
  main_moco.py builds it; its `fc` replaced by the projector) and timm's VisionTransformer with vits.py's
  settings (patch 16, LayerNorm eps 1e-6, qkv bias, the fixed 2-D sin-cos position embedding as a frozen
  parameter, `stop_grad_conv1`; its `head` replaced by the projector);
- builder.py's MoCo: `_build_mlp` (Linear without bias, BatchNorm1d + ReLU between, an affine-free last
  BatchNorm where `last_bn`), 2-layer projector and predictor without last BatchNorm on a ResNet, 3-layer
  projector and a predictor with one on a ViT; the momentum encoder (backbone + projector) averaged over
  its parameters (not its buffers) inside the forward, after the queries and before the keys; the
  contrastive loss against every process's keys with labels offset by rank x per-process batch, times 2T;
  the symmetric sum ctr(q1, k2) + ctr(q2, k1);
- moco/optimizer.py's LARS (weight decay and the trust ratio on parameters of more than one dimension only),
  or torch.optim.AdamW's update (`AdamW`, written out so that the powers of the betas in its bias corrections
  can follow another framework's convention) over `model.parameters()`, as main_moco.py builds them;
- main_moco.py's per-iteration schedules (`adjust_learning_rate`: linear warmup, then a half cosine over
  the epochs after it; `adjust_moco_momentum`), given here as functions of the fractional epoch.

Several processes (DistributedDataParallel without SyncBatchNorm: ppmoco's CPU training) are run in one:
`step(..., ranks=R)` splits the batch into R equal chunks, each "rank" normalises its chunk with its own
BatchNorm running statistics (kept apart between steps, `statistics(rank)`), the keys of all ranks are
concatenated in rank order (concat_all_gather), rank r's labels are offset by r x N, and the gradient is
that of the mean of the ranks' losses (DDP's average). With R = 1 it is builder.py on one GPU.

One framework convention is Paddle's, not PyTorch's: BatchNorm's running variance is updated with the
biased batch variance (PyTorch uses the unbiased one; docs/differences.md). `_PaddleRunningVariance` does
that on every BatchNorm of the networks, so every other difference stays visible. (The test also gives AdamW
Paddle's float32 betas and float32 beta powers: tests/engine/dist_mocov3_worker.py Setup.reference.) Every ReLU is
the same function not in place, so that a test can record or flip the online network's ReLU inputs
(`step(..., relu=)`).

Weights and states come from and go to ppmoco's state-dict keys and layouts (`ppmoco_key`, Linear weights
transposed: Paddle stores [in, out], PyTorch [out, in]), as numpy arrays.
"""
import math
from functools import partial

import numpy as np

from optional_deps import timm_vision_transformer, torch_or_skip, torchvision_or_skip

torch = torch_or_skip()
nn, F = torch.nn, torch.nn.functional


def torchvision_models():
    return torchvision_or_skip().models


# ---------------------------------------------------------------- main_moco.py's schedules

def adjust_learning_rate(base_lr, epoch, warmup_epochs, epochs):
    """main_moco.py: linear warmup from 0, then a half cosine over the remaining epochs (`epoch` fractional)."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def adjust_moco_momentum(base_m, epoch, epochs):
    """main_moco.py's --moco-m-cos: m rises from base_m to 1 along a half cosine (`epoch` fractional)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - base_m)


# ---------------------------------------------------------------- networks

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


def sincos_position_embedding(grid, embed_dim, temperature=10000.0):
    """vits.py's build_2d_sincos_position_embedding, [1, 1 + grid**2, embed_dim] float32, zero row first."""
    grid_w, grid_h = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                    indexing="ij")
    pos_dim = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w, out_h = torch.outer(grid_w.flatten(), omega), torch.outer(grid_h.flatten(), omega)
    pos = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, embed_dim), pos], dim=1)


def vit_small(num_classes, img_size=224, stop_grad_conv1=False):
    """vits.py's vit_small on timm's VisionTransformer (its init is irrelevant here: ppmoco's weights are loaded)."""
    net = timm_vision_transformer()(img_size=img_size, patch_size=16, embed_dim=384, depth=12, num_heads=12,
                                    mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                    num_classes=num_classes)
    net.pos_embed = nn.Parameter(sincos_position_embedding(img_size // 16, 384), requires_grad=False)
    if stop_grad_conv1:
        net.patch_embed.proj.weight.requires_grad = False
        net.patch_embed.proj.bias.requires_grad = False
    return net


def backbone_factory(arch, image_size=224, stop_grad_conv1=False):
    """main_moco.py's `base_encoder` callable for `arch` (a torchvision ResNet or vit_small)."""
    if arch == "vit_small":
        return partial(vit_small, img_size=image_size, stop_grad_conv1=stop_grad_conv1)
    return partial(getattr(torchvision_models(), arch), zero_init_residual=True)


# ---------------------------------------------------------------- builder.py

def build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    layers = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(input_dim if i == 0 else mlp_dim, output_dim if last else mlp_dim, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(output_dim, affine=False))  # SimCLR's last BN, without gamma/beta
    return nn.Sequential(*layers)


class MoCo(nn.Module):
    """builder.py's MoCo_ResNet / MoCo_ViT (by the backbone's type), run as `ranks` processes (module docstring)."""

    def __init__(self, base_encoder, dim=256, mlp_dim=4096, T=1.0):
        super().__init__()
        self.T = T
        self.base_encoder = base_encoder(num_classes=mlp_dim)
        self.momentum_encoder = base_encoder(num_classes=mlp_dim)
        self.vit = hasattr(self.base_encoder, "head") and not hasattr(self.base_encoder, "fc")
        if self.vit:  # MoCo_ViT
            hidden = self.base_encoder.head.weight.shape[1]
            del self.base_encoder.head, self.momentum_encoder.head
            self.base_encoder.head = build_mlp(3, hidden, mlp_dim, dim)
            self.momentum_encoder.head = build_mlp(3, hidden, mlp_dim, dim)
            self.predictor = build_mlp(2, dim, mlp_dim, dim)
        else:  # MoCo_ResNet
            hidden = self.base_encoder.fc.weight.shape[1]
            del self.base_encoder.fc, self.momentum_encoder.fc
            self.base_encoder.fc = build_mlp(2, hidden, mlp_dim, dim)
            self.momentum_encoder.fc = build_mlp(2, hidden, mlp_dim, dim)
            self.predictor = build_mlp(2, dim, mlp_dim, dim, False)
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data.copy_(param_b.data)
            param_m.requires_grad = False
        paddle_running_variance(self)

    @torch.no_grad()
    def update_momentum_encoder(self, m):
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data = param_m.data * m + param_b.data * (1.0 - m)

    def contrastive_loss(self, q, k_all, rank):
        """builder.py's contrastive_loss of rank `rank`'s queries against every rank's keys (gathered)."""
        q = F.normalize(q, dim=1)
        logits = torch.einsum("nc,mc->nm", q, k_all) / self.T
        n = logits.shape[0]
        labels = torch.arange(n, dtype=torch.long) + n * rank
        return F.cross_entropy(logits, labels) * (2 * self.T)


# ---------------------------------------------------------------- moco/optimizer.py

class LARS(torch.optim.Optimizer):
    """moco-v3's LARS: no weight decay and no trust ratio for parameters of one dimension."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    p_norm, d_norm = torch.norm(p), torch.norm(d)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0.0, torch.where(d_norm > 0, g["trust_coefficient"] * p_norm / d_norm,
                                                              one), one)
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(g["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-g["lr"])


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
        self.model = MoCo(backbone_factory(arch, image_size, stop_grad_conv1), dim, mlp_dim, T).to(dtype)
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
                k1.append(F.normalize(model.momentum_encoder(x1[r]), dim=1))
                k2.append(F.normalize(model.momentum_encoder(x2[r]), dim=1))
                buffers[r] = self._buffers()
            k1_all, k2_all = torch.cat(k1), torch.cat(k2)  # concat_all_gather: rank order
        losses = [model.contrastive_loss(q1[r], k2_all, r) + model.contrastive_loss(q2[r], k1_all, r)
                  for r in range(ranks)]
        self.optimizer.zero_grad()
        (sum(losses) / ranks).backward()  # DDP averages the processes' gradients
        self.optimizer.step()
        self._set_buffers(buffers[0])
        self._rank_buffers = buffers if ranks > 1 else None
        return [loss.item() for loss in losses]
