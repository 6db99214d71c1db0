"""Mixed precision keeps MoCo's invariants, tested the way a CPU can.

Paddle applies AMP on GPU only: on CPU `paddle.amp.decorate(level="O2")` returns before casting
and autocast changes nothing. So the tests check what the eager step hands to `decorate`, apply the
O2 cast itself (paddle_internals.o2_cast, the function `decorate` calls on GPU) to see which tensors
it would cast, and check the momentum update under that cast.
"""
import numpy as np
import paddle
import pytest

from ppmoco.engine.env import RunEnv
from ppmoco.engine.step import build_train_step
from ppmoco.modules.moco import MoCo
from ppmoco.paddle_internals import batchnorm_statistics, o2_cast

ENCODER = {"name": "resnet18", "widths": [16, 32, 32, 64]}  # ImageNet stem: every kind of layer
OPT = {"momentum": 0.9, "weight_decay": 1e-4}
ENGINE = {"execution": "eager", "conv": "auto",
          "mix_precision": {"enable": True, "dtype": "bfloat16", "level": "O2", "scale_loss": 1.0,
                            "custom_black_list": [], "custom_white_list": []}}


def make_moco(m=0.999):
    paddle.seed(0)
    return MoCo(base_encoder=ENCODER, projector={"hidden_dim": 64}, dim=16, K=32, m=m)


# Catches: the whole MoCo module handed to decorate (on GPU its key encoder and queue would become
# bfloat16), and the optimizer not decorated (no float32 master weights).
def test_o2_decorates_the_query_encoder_with_the_optimizer(monkeypatch):
    handed = {}

    def spy(models, optimizers=None, level="O1", dtype="float16", **kwargs):
        handed.update(models=models, optimizers=optimizers, level=level, dtype=dtype)
        return models, optimizers

    monkeypatch.setattr(paddle.amp, "decorate", spy)
    moco = make_moco()
    env = RunEnv(device="gpu", world_size=1, rank=0, local_size=1, num_threads=1)
    step = build_train_step(ENGINE, OPT, moco, 0.03, env)
    assert handed["models"] == [moco.encoder_q] and handed["optimizers"] is step.optimizer
    assert (handed["level"], handed["dtype"]) == ("O2", "bfloat16")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_o2_cast_leaves_the_key_encoder_queue_and_norms_float32(dtype):
    moco = make_moco()
    o2_cast(moco.low_precision_layers(), dtype)
    stats = batchnorm_statistics(moco)
    norms = {id(p) for layer in moco.sublayers() if isinstance(layer, paddle.nn.BatchNorm2D)
             for p in layer.parameters()}
    low = [n for n, p in moco.encoder_q.named_parameters() if id(p) not in norms]
    assert low and all(str(p.dtype).endswith(dtype) for n, p in moco.encoder_q.named_parameters()
                       if id(p) not in norms), "the query encoder's convs and linears are cast"
    assert stats and all(p.dtype == paddle.float32 for p in moco.parameters() if id(p) in stats)
    assert all(p.dtype == paddle.float32 for p in moco.encoder_k.parameters())
    assert moco.queue.dtype == paddle.float32


# Catches: a key encoder cast to low precision (its update, 1e-3 of the gap, rounds away in
# bfloat16) and a momentum update that fails on mixed dtypes.
def test_the_momentum_update_moves_the_float32_key_encoder_every_step_under_o2():
    moco = make_moco(m=0.999)
    with paddle.no_grad():
        for p in moco.encoder_q.parameters():
            p.set_value(p + 0.5)  # the query encoder has moved away from the key encoder
    o2_cast(moco.low_precision_layers(), "bfloat16")
    pairs = [(q, k) for q, k in zip(moco.encoder_q.parameters(), moco.encoder_k.parameters())
             if id(k) not in batchnorm_statistics(moco.encoder_k)]
    for _ in range(3):
        before = [(q.astype("float32").numpy(), k.numpy().copy()) for q, k in pairs]
        moco.momentum_update()
        for (q, k_old), (_, k) in zip(before, pairs):
            expected = (1 - 0.999) * (q - k_old)
            np.testing.assert_allclose(k.numpy() - k_old, expected, rtol=2e-2, atol=1e-7)
            assert np.abs(k.numpy() - k_old).max() > 0


# Catches: the GPU step computing outside autocast, or dropping the configured dtype, level or op
# lists (they decide which ops run in low precision; without a GPU what the step hands autocast is
# what can be checked), and the CPU step entering autocast (which does nothing there; bfloat16 on
# CPU is the convolution operator's, tests/engine/test_eager_step.py).
def test_the_gpu_step_runs_the_method_inside_the_configured_autocast(monkeypatch):
    entered, inside = [], []

    class Spy:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def __enter__(self):
            entered.append(self.kwargs)
            inside.append(True)

        def __exit__(self, *exc):
            inside.pop()
            return False

    moco = make_moco()
    calls = []
    original = moco.training_step
    monkeypatch.setattr(moco, "training_step", lambda batch: calls.append(bool(inside)) or original(batch))
    monkeypatch.setattr(paddle.amp, "auto_cast", Spy)
    amp = dict(ENGINE["mix_precision"], level="O1", custom_black_list=["reduce_sum"], custom_white_list=["matmul"])
    env = RunEnv(device="gpu", world_size=1, rank=0, local_size=1, num_threads=1)
    step = build_train_step(dict(ENGINE, mix_precision=amp), OPT, moco, 0.03, env)
    views = [paddle.randn([4, 3, 32, 32]) for _ in range(2)]
    step(views)
    assert entered == [{"level": "O1", "dtype": "bfloat16", "custom_white_list": ["matmul"],
                        "custom_black_list": ["reduce_sum"]}]
    assert calls == [True]  # training_step ran while the autocast context was open
    cpu = RunEnv(device="cpu", world_size=1, rank=0, local_size=1, num_threads=1)
    step = build_train_step(dict(ENGINE, mix_precision=dict(amp, dtype="float16"), execution="eager"), OPT, moco,
                            0.03, cpu)
    step(views)
    assert len(entered) == 1 and calls == [True, False]
