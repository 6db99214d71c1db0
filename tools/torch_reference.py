"""The PyTorch references tools/benchmark.py measures ppmoco against (torch and torchvision are optional).

- `TorchMoCo`: the official MoCo step as facebookresearch/moco's builder.py computes it, on
  torchvision's ResNet with PyTorch's own BatchNorm: query forward, momentum update of the key
  encoder, key forward on the shuffled batch (one process: a permutation and its inverse, what
  `_batch_shuffle_ddp` does with one rank), InfoNCE against the queue, enqueue, SGD. This is the
  step a PyTorch user runs; the exactness reference of the tests (tests/torch_moco_reference.py)
  follows Paddle's BatchNorm convention instead and is not meant to be fast.
- `moco_v2_views`: the official MoCo v2 data pipeline (main_moco.py `--aug-plus`, TwoCropsTransform).

torchvision's wheel on PyPI is built against the CUDA torch; with the CPU torch its C extension does
not load and torchvision 0.28's import then fails registering fake kernels for two detection ops it
never finds. Neither op is used here: `import_torchvision` declares their schemas so the import
passes, and everything used below is pure Python on PIL images and torch tensors.
"""
import random
import sys

import torch
import torch.nn.functional as F
from torch import nn


def import_torchvision():
    """torchvision, importable with the CPU torch wheel (see the module docstring)."""
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import torchvision
        import_torchvision.lib = lib  # the declarations live as long as the library object
    return torchvision


def moco_encoder(arch, dim, hidden_dim, cifar_stem):
    """builder.py's encoder: torchvision's ResNet with `num_classes=dim`, MoCo v2's MLP head
    (Linear-ReLU-fc; builder.py's hidden width is the backbone's, `hidden_dim` here) unless
    `hidden_dim` is None, and for CIFAR-sized images the usual 3x3/1 stem without max-pool."""
    models = import_torchvision().models
    net = getattr(models, arch)(num_classes=dim)
    if hidden_dim is not None:
        net.fc = nn.Sequential(nn.Linear(net.fc.weight.shape[1], hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim))
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    return net


class TorchMoCo(nn.Module):
    """builder.py's MoCo on one process (its forward and `_dequeue_and_enqueue`)."""

    def __init__(self, arch, dim=128, K=65536, m=0.999, T=0.07, hidden_dim=2048, cifar_stem=False):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q = moco_encoder(arch, dim, hidden_dim, cifar_stem)
        self.encoder_k = moco_encoder(arch, dim, hidden_dim, cifar_stem)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.queue_ptr = 0

    @torch.no_grad()
    def momentum_update(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    def forward(self, im_q, im_k):
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self.momentum_update()
            shuffle = torch.randperm(im_k.shape[0])
            k = F.normalize(self.encoder_k(im_k[shuffle]), dim=1)[torch.argsort(shuffle)]
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        with torch.no_grad():
            n = k.shape[0]
            self.queue[:, self.queue_ptr:self.queue_ptr + n] = k.T
            self.queue_ptr = (self.queue_ptr + n) % self.K
        return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))


def torch_moco_step(model, lr=0.03, momentum=0.9, weight_decay=1e-4):
    """step(im_q, im_k) -> loss (float): main_moco.py's training step (SGD with momentum and L2)."""
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
    model.train()

    def step(im_q, im_k):
        loss = model(im_q, im_k)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


class _PILGaussianBlur:
    """main_moco.py's GaussianBlur: PIL's blur with a radius uniform in `sigma`."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def moco_v2_views(size=224):
    """path -> [view, view]: Image.open(path).convert('RGB') through main_moco.py's `--aug-plus`
    augmentation twice (TwoCropsTransform)."""
    from PIL import Image

    T = import_torchvision().transforms
    augment = T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([_PILGaussianBlur([0.1, 2.0])], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])

    def load(path):
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return [augment(img), augment(img)]
    return load
