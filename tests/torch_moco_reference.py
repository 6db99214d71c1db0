"""MoCo's training step in PyTorch, written for the tests from facebookresearch/moco `builder.py`.

An independent reference for ppmoco's step: plain torch (torchvision's ResNet layout and names,
written out here because the CPU torch wheel has no matching torchvision), the key encoder's
momentum update over parameters only, shuffle BN by an index permutation and its inverse, InfoNCE
with the positive at index 0 against a detached copy of the queue, the keys enqueued in the same
forward, and torch's SGD (momentum, L2 weight decay). It runs in float32 or float64 and starts from
ppmoco's own initial weights, so the two frameworks compute the same function from the same state.

`bn_splits` runs each encoder on that many chunks of the batch, as ppmoco's single-process BN
groups do; every chunk updates the running statistics in turn.

One framework convention is Paddle's, not PyTorch's: BatchNorm's running variance is updated with
the biased batch variance (PyTorch uses the unbiased one, n/(n-1) larger;
docs/differences.md). `BatchNorm2d` below does that, so every other difference stays visible.
"""
import numpy as np

from optional_deps import torch_or_skip

torch = torch_or_skip()
F = torch.nn.functional
nn = torch.nn


_relu_tap = None  # while MoCoReference.step runs the query encoder: its `relu` argument


def relu(x):
    """F.relu, or the query encoder's ReLU tap (MoCoReference.step's `relu`)."""
    return F.relu(x) if _relu_tap is None else _relu_tap(x)


class ReLU(nn.Module):
    """nn.ReLU through `relu` (the head's ReLU is the query encoder's too)."""

    def forward(self, x):
        return relu(x)


class BatchNorm2d(nn.BatchNorm2d):
    """torch BatchNorm whose running variance follows Paddle's convention (biased batch variance)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        with torch.no_grad():
            mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.downsample = _shortcut(in_ch, planes, stride)

    def forward(self, x):
        out = relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = BatchNorm2d(planes * 4)
        self.downsample = _shortcut(in_ch, planes * 4, stride)

    def forward(self, x):
        out = relu(self.bn1(self.conv1(x)))
        out = relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return relu(out + (x if self.downsample is None else self.downsample(x)))


def _shortcut(in_ch, out_ch, stride):
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), BatchNorm2d(out_ch))


ARCHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
    """torchvision's ResNet (or its CIFAR variant: 3x3/1 stem, no max-pool) with `fc` as MoCo's head."""

    def __init__(self, arch, widths, cifar_stem, hidden_dim, dim):
        super().__init__()
        block, layers = ARCHS[arch]
        self.conv1 = (nn.Conv2d(3, widths[0], 3, 1, 1, bias=False) if cifar_stem
                      else nn.Conv2d(3, widths[0], 7, 2, 3, bias=False))
        self.bn1 = BatchNorm2d(widths[0])
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        in_ch = widths[0]
        for i, (planes, depth) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(depth):
                blocks.append(block(in_ch, planes, 2 if i > 0 and j == 0 else 1))
                in_ch = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        # builder.py: the MLP head is Linear-ReLU-fc on the backbone's pooled features
        self.fc = (nn.Sequential(nn.Linear(in_ch, dim)) if hidden_dim is None else
                   nn.Sequential(nn.Linear(in_ch, hidden_dim), ReLU(), nn.Linear(hidden_dim, dim)))

    def forward(self, x):
        x = self.maxpool(relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def torch_name(key):
    """ppmoco state-dict key -> this reference's (`encoder_q.backbone.bn1._mean` -> `encoder_q.bn1.running_mean`)."""
    key = key.replace(".backbone.", ".").replace(".head.", ".fc.")
    return key.replace("._mean", ".running_mean").replace("._variance", ".running_var")


def _is_linear_weight(key, value):
    return key.startswith("fc.") and key.endswith(".weight") and value.ndim == 2


def _to_torch(name, value, dtype):
    value = value.T if _is_linear_weight(name, value) else value
    return torch.tensor(np.ascontiguousarray(value), dtype=dtype)


class MoCoReference:
    """The reference step, started from a ppmoco MoCo state dict (numpy arrays)."""

    def __init__(self, ppmoco_state, arch, widths=(64, 128, 256, 512), cifar_stem=False,
                 hidden_dim=None, dim=128, m=0.999, T=0.07, bn_splits=1, lr=0.05, momentum=0.9,
                 weight_decay=1e-4, dtype=torch.float64):
        self.m, self.T, self.bn_splits, self.dtype = m, T, bn_splits, dtype
        self.encoder_q = ResNet(arch, widths, cifar_stem, hidden_dim, dim).to(dtype)
        self.encoder_k = ResNet(arch, widths, cifar_stem, hidden_dim, dim).to(dtype)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.optimizer = torch.optim.SGD(self.encoder_q.parameters(), lr, momentum=momentum,
                                         weight_decay=weight_decay)
        self.load(ppmoco_state)

    def load(self, ppmoco_state, velocity=None):
        """Take every tensor from a ppmoco MoCo state dict and, optionally, the SGD momentum
        buffers from `velocity` ({parameter's ppmoco key: array})."""
        self.queue = torch.tensor(ppmoco_state["queue"], dtype=self.dtype)
        self.queue_ptr = int(ppmoco_state["queue_ptr"][0])
        self.K = self.queue.shape[1]
        self.keys = {torch_name(k): k for k in ppmoco_state}
        for prefix, encoder in (("encoder_q.", self.encoder_q), ("encoder_k.", self.encoder_k)):
            own = {torch_name(k)[len(prefix):]: _to_torch(torch_name(k)[len(prefix):], v, self.dtype)
                   for k, v in ppmoco_state.items() if k.startswith(prefix)}
            missing, unexpected = encoder.load_state_dict(own, strict=False)
            assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
        if velocity is not None:
            params = dict(self.encoder_q.named_parameters())
            for key, value in velocity.items():
                name = torch_name(key)[len("encoder_q."):]
                self.optimizer.state[params[name]]["momentum_buffer"] = _to_torch(name, value, self.dtype)

    def velocity(self):
        """The SGD momentum buffers as {parameter's ppmoco key: array} (empty before a step)."""
        out = {}
        for name, p in self.encoder_q.named_parameters():
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                value = buf.detach().numpy()
                out[self.keys["encoder_q." + name]] = value.T.copy() if _is_linear_weight(name, value) else value.copy()
        return out

    def _grouped(self, encoder, x):
        return torch.cat([encoder(c) for c in torch.chunk(x, self.bn_splits)], dim=0)

    def step(self, im_q, im_k, perm, relu=None):
        """One training step on numpy views; `perm` is the key batch's shuffle permutation. `relu`,
        if given, computes every ReLU of the query encoder's forward (called with each input in
        order, e.g. to record it or to flip a unit's mask; tests/moco_equivalence.py)."""
        global _relu_tap
        im_q, im_k = (torch.tensor(a, dtype=self.dtype) for a in (im_q, im_k))
        perm = torch.as_tensor(perm, dtype=torch.long)
        self.encoder_q.train()
        self.encoder_k.train()
        _relu_tap = relu
        try:
            q = F.normalize(self._grouped(self.encoder_q, im_q), dim=1)
        finally:
            _relu_tap = None
        with torch.no_grad():
            for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                pk.data = pk.data * self.m + pq.data * (1.0 - self.m)
            k = F.normalize(self._grouped(self.encoder_k, im_k[perm]), dim=1)
            k = k[torch.argsort(perm)]
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        loss = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))
        n = k.shape[0]
        self.queue[:, self.queue_ptr:self.queue_ptr + n] = k.T
        self.queue_ptr = (self.queue_ptr + n) % self.K
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "logits": logits.detach().numpy()}

    def state(self):
        """Every tensor as a ppmoco MoCo state dict (ppmoco's keys and layouts)."""
        out = {"queue": self.queue.numpy().copy(), "queue_ptr": np.array([self.queue_ptr])}
        for prefix, encoder in (("encoder_q.", self.encoder_q), ("encoder_k.", self.encoder_k)):
            for name, value in encoder.state_dict().items():
                if name.endswith("num_batches_tracked"):
                    continue
                value = value.detach().numpy()
                out[self.keys[prefix + name]] = value.T.copy() if _is_linear_weight(name, value) else value.copy()
        return out
