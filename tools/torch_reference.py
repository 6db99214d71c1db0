"""The PyTorch references tools/benchmark.py measures ppmoco against (torch and torchvision are optional;
timm for the ViT).

- `TorchMoCo`: the official MoCo step as facebookresearch/moco's builder.py computes it, on
  torchvision's ResNet with PyTorch's own BatchNorm: query forward, momentum update of the key
  encoder, key forward on the shuffled batch (one process: a permutation and its inverse, what
  `_batch_shuffle_ddp` does with one rank), InfoNCE against the queue, enqueue, SGD. This is the
  step a PyTorch user runs; the exactness reference of the tests (tests/torch_moco_reference.py)
  follows Paddle's BatchNorm convention instead and is not meant to be fast.
- `TorchMoCoV3`: facebookresearch/moco-v3's builder.py (MoCo_ResNet / MoCo_ViT) with `build_mlp`, on
  `backbone_factory`'s networks as main_moco.py builds them (torchvision's ResNet with
  `zero_init_residual=True`, or vits.py's `vit_small` on timm's VisionTransformer with the fixed sin-cos
  position embedding), PyTorch's own BatchNorm; `LARS` is moco/optimizer.py's. `torch_mocov3_step` is
  main_moco.py's iteration on one process (no gather: the keys are the process's own). The exactness
  reference of the MoCo v3 tests (tests/torch_mocov3_reference.py) runs these same classes, converted
  to Paddle's BatchNorm convention.
- `moco_v2_views`, `moco_v3_views`: the official data pipelines (MoCo v2: main_moco.py `--aug-plus`;
  MoCo v3: main_moco.py's BYOL augmentations), two views of an image (TwoCropsTransform).

torchvision's wheel on PyPI is built against the CUDA torch; with the CPU torch its C extension does
not load and torchvision 0.28's import then fails registering fake kernels for two detection ops it
never finds. Neither op is used here: `import_torchvision` declares their schemas so the import
passes, and everything used below is pure Python on PIL images and torch tensors. timm imports
torchvision, so `vit_small` imports it through `import_torchvision` first.
"""
import random
import sys
from functools import partial

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


# ---------------------------------------------------------------- MoCo v3

def sincos_position_embedding(grid, embed_dim, temperature=10000.0):
    """vits.py's build_2d_sincos_position_embedding, [1, 1 + grid**2, embed_dim] float32, zero row first."""
    grid_w, grid_h = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                    indexing="ij")
    pos_dim = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w, out_h = torch.outer(grid_w.flatten(), omega), torch.outer(grid_h.flatten(), omega)
    pos = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, embed_dim), pos], dim=1)


VIT_SMALL = {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 12, "mlp_ratio": 4}  # vits.py's


def vit_small(num_classes, img_size=224, stop_grad_conv1=False):
    """vits.py's vit_small on timm's VisionTransformer: patch 16, width 384, depth 12, 12 heads, LayerNorm eps
    1e-6, the fixed sin-cos position embedding as a frozen parameter, `stop_grad_conv1` (timm's weight
    initialisation, not vits.py's: the exactness tests load ppmoco's weights, the benchmark times the step)."""
    import_torchvision()  # timm imports torchvision (see the module docstring)
    from timm.models.vision_transformer import VisionTransformer

    net = VisionTransformer(img_size=img_size, **VIT_SMALL, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                            num_classes=num_classes)
    grid = img_size // VIT_SMALL["patch_size"]
    net.pos_embed = nn.Parameter(sincos_position_embedding(grid, VIT_SMALL["embed_dim"]), requires_grad=False)
    if stop_grad_conv1:
        net.patch_embed.proj.weight.requires_grad = False
        net.patch_embed.proj.bias.requires_grad = False
    return net


def backbone_factory(arch, image_size=224, stop_grad_conv1=False):
    """main_moco.py's `base_encoder` callable for `arch`: vit_small, or torchvision's ResNet of that name
    with `zero_init_residual=True`."""
    if arch == "vit_small":
        return partial(vit_small, img_size=image_size, stop_grad_conv1=stop_grad_conv1)
    return partial(getattr(import_torchvision().models, arch), zero_init_residual=True)


def build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
    """builder.py's _build_mlp: Linear layers without bias, BatchNorm1d + ReLU between them, and after the
    last one an affine-free BatchNorm1d where `last_bn`."""
    layers = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(input_dim if i == 0 else mlp_dim, output_dim if last else mlp_dim, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(mlp_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(output_dim, affine=False))  # SimCLR's last BN, without gamma/beta
    return nn.Sequential(*layers)


class TorchMoCoV3(nn.Module):
    """builder.py's MoCo_ResNet or MoCo_ViT, by the backbone `base_encoder(num_classes=mlp_dim)` builds (a
    ViT has a `head`, a ResNet an `fc`, which the projector replaces)."""

    def __init__(self, base_encoder, dim=256, mlp_dim=4096, T=1.0):
        super().__init__()
        self.T = T
        self.base_encoder = base_encoder(num_classes=mlp_dim)
        self.momentum_encoder = base_encoder(num_classes=mlp_dim)
        self.vit = hasattr(self.base_encoder, "head") and not hasattr(self.base_encoder, "fc")
        if self.vit:  # MoCo_ViT: 3-layer projector, predictor with its last BatchNorm
            hidden = self.base_encoder.head.weight.shape[1]
            del self.base_encoder.head, self.momentum_encoder.head
            self.base_encoder.head = build_mlp(3, hidden, mlp_dim, dim)
            self.momentum_encoder.head = build_mlp(3, hidden, mlp_dim, dim)
            self.predictor = build_mlp(2, dim, mlp_dim, dim)
        else:  # MoCo_ResNet: 2-layer projector, predictor without
            hidden = self.base_encoder.fc.weight.shape[1]
            del self.base_encoder.fc, self.momentum_encoder.fc
            self.base_encoder.fc = build_mlp(2, hidden, mlp_dim, dim)
            self.momentum_encoder.fc = build_mlp(2, hidden, mlp_dim, dim)
            self.predictor = build_mlp(2, dim, mlp_dim, dim, False)
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data.copy_(param_b.data)
            param_m.requires_grad = False

    @torch.no_grad()
    def update_momentum_encoder(self, m):
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data = param_m.data * m + param_b.data * (1.0 - m)

    def contrastive_loss(self, q, k, rank=0):
        """builder.py's contrastive_loss of process `rank`'s queries `q` against the keys `k` of every process
        (concat_all_gather's, in rank order; one process: its own), scaled by 2T."""
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", q, k) / self.T
        n = logits.shape[0]
        labels = torch.arange(n, dtype=torch.long) + n * rank
        return F.cross_entropy(logits, labels) * (2 * self.T)

    def forward(self, x1, x2, m):
        """builder.py's forward on one process: the symmetric loss of the two views at momentum `m`."""
        q1, q2 = self.predictor(self.base_encoder(x1)), self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self.update_momentum_encoder(m)
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


class LARS(torch.optim.Optimizer):
    """moco-v3's LARS (moco/optimizer.py): no weight decay and no trust ratio for parameters of one dimension."""

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


MOCOV3_OPTIMIZERS = {"LARS": LARS, "AdamW": torch.optim.AdamW}  # main_moco.py's --optimizer lars / adamw


def torch_mocov3_step(model, m, optimizer, lr, **settings):
    """step(x1, x2) -> loss (float): main_moco.py's iteration at momentum `m` on one process (float32: the
    GradScaler of its CUDA autocast does nothing here), `optimizer` ("LARS" or "AdamW", built with `lr` and
    `settings` as the class names them) over model.parameters(), as main_moco.py builds it."""
    opt = MOCOV3_OPTIMIZERS[optimizer](model.parameters(), lr, **settings)
    model.train()

    def step(x1, x2):
        loss = model(x1, x2, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()
    return step


# ---------------------------------------------------------------- data pipelines

class _PILGaussianBlur:
    """moco's and moco-v3's loader.GaussianBlur: PIL's blur with a radius uniform in `sigma`."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def _two_views(first, second):
    """path -> [first(image), second(image)] of Image.open(path).convert('RGB') (TwoCropsTransform)."""
    from PIL import Image

    def load(path):
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return [first(img), second(img)]
    return load


def _to_normalized_tensor(T):
    """The pipelines' last transforms (torchvision's `T`): to a tensor, ImageNet's normalisation."""
    return [T.ToTensor(), T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])]


def moco_v2_views(size=224):
    """path -> [view, view]: main_moco.py's `--aug-plus` augmentation twice."""
    T = import_torchvision().transforms
    augment = T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([_PILGaussianBlur([0.1, 2.0])], p=0.5),
        T.RandomHorizontalFlip(),
        *_to_normalized_tensor(T),
    ])
    return _two_views(augment, augment)


def _solarize(img):
    """moco-v3's loader.Solarize (BYOL's): PIL's solarize at its default threshold."""
    from PIL import ImageOps

    return ImageOps.solarize(img)


def moco_v3_views(size=224, crop_min=0.08):
    """path -> [view, view]: MoCo v3 main_moco.py's augmentation1 and augmentation2 (BYOL's: blur always on the
    first view, blur at 0.1 and solarize at 0.2 on the second), crops of `crop_min` (`--crop-min`) to 1."""
    T = import_torchvision().transforms

    def augmentation(blur, *extra):
        return T.Compose([
            T.RandomResizedCrop(size, scale=(crop_min, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([_PILGaussianBlur([0.1, 2.0])], p=blur),
            *extra,
            T.RandomHorizontalFlip(),
            *_to_normalized_tensor(T),
        ])
    return _two_views(augmentation(1.0), augmentation(0.1, T.RandomApply([_solarize], p=0.2)))
