import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from ppmoco.distributed import batch_shuffle, batch_unshuffle
from ppmoco.errors import ConfigError
from ppmoco.modules import build_module
from ppmoco.modules.moco import MoCo, info_nce

TINY = {"name": "resnet18", "widths": [4, 8, 8, 8], "cifar_stem": True}


def make_moco(**kw):
    paddle.seed(0)
    args = dict(base_encoder=TINY, projector={"hidden_dim": 16}, dim=8, K=16, m=0.9, T=0.2)
    args.update(kw)
    return MoCo(**args)


def numpy_info_nce(q, k, queue, T):
    logits = np.concatenate([(q * k).sum(1, keepdims=True), q @ queue], axis=1) / T
    logits = logits - logits.max(1, keepdims=True)
    log_prob = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -log_prob[:, 0].mean()


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_info_nce_matches_numpy():
    rng = np.random.default_rng(1)
    q, k = unit_rows(rng, 6, 8), unit_rows(rng, 6, 8)
    queue = unit_rows(rng, 20, 8).T.copy()
    loss, logits = info_nce(paddle.to_tensor(q), paddle.to_tensor(k), paddle.to_tensor(queue), 0.07)
    assert logits.shape == [6, 21]
    np.testing.assert_allclose(float(loss), numpy_info_nce(q, k, queue, 0.07), rtol=1e-5)


def test_training_step_loss_and_enqueue_against_reference():
    """With m=0 the key encoder equals the query encoder, so q, k and the loss can be recomputed."""
    moco = make_moco(m=0.0)
    moco.train()
    rng = np.random.default_rng(2)
    im_q = paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype("float32"))
    im_k = paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype("float32"))
    queue_before = moco.queue.numpy().copy()
    with paddle.no_grad():
        q_ref = F.normalize(moco.encoder_q(im_q), axis=1).numpy()
        k_ref = F.normalize(moco.encoder_q(im_k), axis=1).numpy()
    out = moco.training_step([im_q, im_k])
    np.testing.assert_allclose(float(out.loss), numpy_info_nce(q_ref, k_ref, queue_before, 0.2),
                               rtol=1e-4)
    np.testing.assert_array_equal(moco.queue.numpy(), queue_before)  # enqueued only by after_step
    out.loss.backward()
    assert moco.encoder_q.head[0].weight.grad is not None
    assert all(p.grad is None for p in moco.encoder_k.parameters())
    moco.after_step(out.after_step)
    np.testing.assert_allclose(moco.queue.numpy()[:, :4], k_ref.T, atol=1e-5)
    np.testing.assert_array_equal(moco.queue.numpy()[:, 4:], queue_before[:, 4:])
    assert int(moco.queue_ptr[0]) == 4


def test_enqueue_wraps_around():
    moco = make_moco(K=8, dim=2)
    for step in range(3):
        keys = paddle.full([4, 2], float(step + 1))
        moco.enqueue(keys)
    queue = moco.queue.numpy()
    np.testing.assert_array_equal(queue[:, :4], np.full((2, 4), 3.0))  # third batch overwrote the first
    np.testing.assert_array_equal(queue[:, 4:], np.full((2, 4), 2.0))
    assert int(moco.queue_ptr[0]) == 4


def test_momentum_update_touches_parameters_only():
    moco = make_moco(m=0.75)
    with paddle.no_grad():
        for p in moco.encoder_q.parameters():
            p.set_value(paddle.full(p.shape, 1.0, p.dtype))
        for p in moco.encoder_k.parameters():
            p.set_value(paddle.full(p.shape, 3.0, p.dtype))
    moco.momentum_update()
    for name, p in moco.encoder_k.named_parameters():
        expected = 3.0 if name.endswith(("_mean", "_variance")) else 0.75 * 3.0 + 0.25 * 1.0
        np.testing.assert_allclose(p.numpy(), expected, err_msg=name)
    bn_stats = [n for n, _ in moco.encoder_k.named_parameters() if n.endswith("_mean")]
    assert bn_stats, "the tiny ResNet must have BatchNorm statistics for this test to mean anything"


def test_key_encoder_starts_as_copy_and_is_frozen():
    moco = make_moco()
    for (n, q), k in zip(moco.encoder_q.state_dict().items(), moco.encoder_k.state_dict().values()):
        np.testing.assert_array_equal(q.numpy(), k.numpy(), err_msg=n)
    assert all(p.stop_gradient for p in moco.encoder_k.parameters())
    trainable = moco.trainable_parameters()
    assert trainable and all(not p.stop_gradient for p in trainable)
    assert not {id(p) for p in trainable} & {id(p) for p in moco.encoder_k.parameters()}


def test_shuffle_unshuffle_single_process_roundtrip():
    paddle.seed(3)
    x = paddle.arange(24, dtype="float32").reshape([8, 3])
    shuffled, undo = batch_shuffle(x)
    assert sorted(shuffled[:, 0].numpy().tolist()) == sorted(x[:, 0].numpy().tolist())
    assert not np.array_equal(shuffled.numpy(), x.numpy())
    np.testing.assert_array_equal(batch_unshuffle(shuffled, undo).numpy(), x.numpy())


def test_bn_splits_give_each_group_its_own_statistics():
    """bn_splits=2 must equal running the encoder separately on the two halves."""
    moco = make_moco(bn_splits=2)
    moco.train()
    x = paddle.to_tensor(np.random.default_rng(4).standard_normal((4, 3, 16, 16)).astype("float32"))
    with paddle.no_grad():
        halves = [moco.encoder_q(x[:2]).numpy(), moco.encoder_q(x[2:]).numpy()]
        grouped = moco._grouped(moco.encoder_q, x).numpy()
        whole = moco.encoder_q(x).numpy()
    np.testing.assert_allclose(grouped, np.concatenate(halves), rtol=1e-5, atol=1e-6)
    assert not np.allclose(grouped, whole, atol=1e-4)


@pytest.mark.parametrize("K,batch,msg", [(16, 5, "multiple"), (16, 32, "multiple"), (16, 4, None)])
def test_setup_checks_K_against_global_batch(K, batch, msg):
    moco = make_moco(K=K)
    if msg is None:
        moco.setup(batch)
    else:
        with pytest.raises(ConfigError, match="Model.model.K"):
            moco.setup(batch)


def test_build_module_reports_unknown_keys():
    cfg = {"module": "MOCOModule", "model": {"base_encoder": TINY, "Kk": 3}}
    with pytest.raises(ConfigError, match=r"Model.model.Kk: unknown key \(did you mean 'K'\?\)"):
        build_module(cfg)
    with pytest.raises(ConfigError, match=r"Model.module: unknown module 'MOCOModul'"):
        build_module({"module": "MOCOModul", "model": {}})
    with pytest.raises(ConfigError, match="Model.model.T: 0 is out of range"):
        build_module({"module": "MOCOModule", "model": {"base_encoder": TINY, "T": 0}})


def test_enqueue_continues_from_a_loaded_pointer():
    moco = make_moco(K=8, dim=2)
    moco.enqueue(paddle.full([4, 2], 1.0))  # the pointer now says 4
    state = moco.state_dict()
    state["queue_ptr"] = paddle.to_tensor([2], dtype="int64")
    moco.set_state_dict(state)
    moco.enqueue(paddle.full([4, 2], 5.0))
    np.testing.assert_array_equal(moco.queue.numpy()[0], [1, 1, 5, 5, 5, 5, moco.queue.numpy()[0, 6],
                                                          moco.queue.numpy()[0, 7]])
    assert int(moco.queue_ptr[0]) == 6


def test_the_queue_starts_as_unit_random_keys():
    # builder.py: queue = normalize(randn(dim, K), dim=0), each column a unit key, drawn from the
    # seeded generator. Catches: columns left unnormalised, normalised along the wrong axis, or equal.
    moco = make_moco(dim=8, K=32)
    queue = moco.queue.numpy()
    assert queue.shape == (8, 32) and int(moco.queue_ptr[0]) == 0
    np.testing.assert_allclose(np.linalg.norm(queue, axis=0), np.ones(32), rtol=1e-6)
    assert not np.allclose(np.linalg.norm(queue, axis=1), np.linalg.norm(queue, axis=1)[0])  # rows are not unit
    assert np.linalg.matrix_rank(queue) == 8
