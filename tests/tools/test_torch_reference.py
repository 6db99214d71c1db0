"""tools/torch_reference.py, the PyTorch steps tools/benchmark.py measures ppmoco against, compute MoCo's
and MoCo v3's steps: from the same weights, views (and queue) each follows the tests' exactness reference
(tests/torch_moco_reference.py, tests/torch_mocov3_reference.py) over two steps."""
import os
import sys

import numpy as np
import pytest

from moco_equivalence import Setup, numpy_state
from optional_deps import torch_or_skip
from torch_mocov3_reference import MoCoV3Reference

torch = torch_or_skip()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
from torch_reference import (  # noqa: E402
    TorchMoCo,
    TorchMoCoV3,
    backbone_factory,
    torch_moco_step,
    torch_mocov3_step,
)


def test_benchmark_reference_computes_the_moco_step(monkeypatch):
    setup = Setup(arch="resnet18", px=32, batch=8, hidden_dim=256, K=64, steps=2)
    exact = setup.reference(numpy_state(setup.moco()), "float32")
    torch.manual_seed(0)
    fast = TorchMoCo("resnet18", dim=setup.dim, K=setup.K, m=setup.m, T=setup.T, hidden_dim=setup.hidden_dim)
    for ours, theirs in ((fast.encoder_q, exact.encoder_q), (fast.encoder_k, exact.encoder_k)):
        missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
        assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    fast.queue.copy_(exact.queue)
    fast.queue_ptr = exact.queue_ptr
    step = torch_moco_step(fast, lr=setup.lr, momentum=0.9, weight_decay=1e-4)
    # The same shuffle permutations, so the two compute in the same order: equal to the last bit
    # apart from the running variance (Paddle's convention in the exactness reference) and the BN
    # step counter (which the exactness reference does not keep).
    permutations = setup.permutations()
    drawn = iter(permutations)
    monkeypatch.setattr(torch, "randperm", lambda n: torch.as_tensor(next(drawn)))
    # Catches: a wrong temperature or loss (the losses), a missing momentum update of the key encoder,
    # a wrong unshuffle or a missing/misplaced enqueue (step 2's loss and the queue), SGD without
    # momentum or decay (the query encoder after step 2).
    for views, perm in zip(setup.views(), permutations):
        expected = exact.step(*views, perm)["loss"]
        assert step(*(torch.from_numpy(v) for v in views)) == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(fast.queue.numpy(), exact.queue.numpy(), rtol=0, atol=1e-6)
    assert fast.queue_ptr == exact.queue_ptr == 2 * setup.batch
    for ours, theirs in ((fast.encoder_q, exact.encoder_q), (fast.encoder_k, exact.encoder_k)):
        own = ours.state_dict()
        for name, value in theirs.state_dict().items():
            if not name.endswith(("running_var", "num_batches_tracked")):
                np.testing.assert_allclose(own[name].numpy(), value.numpy(), rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("optimizer,settings", [
    ("LARS", {"weight_decay": 1e-6, "momentum": 0.9, "trust_coefficient": 0.001}),
    ("AdamW", {"weight_decay": 0.1, "betas": (0.9, 0.999), "eps": 1e-8}),
])
def test_benchmark_reference_computes_the_mocov3_step(optimizer, settings):
    """The MoCo v3 step tools/benchmark.py measures (TorchMoCoV3's forward and torch_mocov3_step, PyTorch's
    BatchNorm) computes the step of the tests' exactness reference (tests/torch_mocov3_reference.py, one
    process) over two steps from the same weights. Catches: the momentum m not reaching the update (step 2's
    loss: at step 1 both encoders are equal), the gradient not zeroed between steps or the optimizer built
    with other settings (the parameters after step 2)."""
    arch, lr, m, px = "resnet18", 0.05, 0.9, 16  # the ViT's network and head: test_mocov3_reference.py
    exact = MoCoV3Reference(arch, image_size=px, dim=32, mlp_dim=64, T=0.2, optimizer=optimizer, **settings,
                            dtype=torch.float32)
    torch.manual_seed(0)
    fast = TorchMoCoV3(backbone_factory(arch, px), dim=32, mlp_dim=64, T=0.2)
    fast.load_state_dict(exact.model.state_dict())
    step = torch_mocov3_step(fast, m, optimizer, lr, **settings)
    rng = np.random.default_rng(0)
    for _ in range(2):
        x1, x2 = (rng.standard_normal((8, 3, px, px)).astype("float32") for _ in range(2))
        expected = exact.step(x1, x2, lr, m)[0]
        assert step(torch.from_numpy(x1), torch.from_numpy(x2)) == pytest.approx(expected, rel=1e-6)
    own = fast.state_dict()
    for name, value in exact.model.state_dict().items():
        if not name.endswith(("running_var", "num_batches_tracked")):  # Paddle's convention in the reference
            np.testing.assert_allclose(own[name].numpy(), value.numpy(), rtol=0, atol=1e-6, err_msg=name)
