"""The supervised-contrastive MoCo variants against NumPy re-computations written from their formulas.

The references loop over anchors and keep the queue's filled slots as a separate mask, so they share
no masking trick with the implementation. Inputs: a partly filled queue whose empty slots hold the
EMPTY marker, queries of class 0 (the label a zero-filled label queue would give every empty slot),
and a query whose class is nowhere else (its own key is its only positive).
"""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from ppmoco.errors import ConfigError
from ppmoco.metrics import topk_accuracy
from ppmoco.modules import MODULES, build_module
from ppmoco.modules.moco import MoCo, info_nce
from ppmoco.modules.supcon import (
    EMPTY,
    SupConIn,
    SupConOut,
    SupConSuploss,
    key_log_probs,
    key_positives,
    positive_hit_rate,
    supcon_in,
    supcon_out,
    suploss,
)

TINY = {"name": "resnet18", "widths": [4, 8, 8, 8], "cifar_stem": True}
T, BASE_T = 0.2, 0.07
LABELS = np.array([0, 0, 1, 2, 0, 7])  # class 7: in no queue slot and no other query
SLOT_LABELS = np.array([0, 1, 1, 2, 0, 2, 1, 0, 0, 0, 0, 0])  # slots 8.. are empty but carry 0 here
FILLED = np.arange(12) < 8


def lse(x):
    return np.log(np.exp(x - x.max()).sum()) + x.max()


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_key_terms(q, k, queue, labels, slot_labels, filled, i):
    """s_i over A(i) = [k_i, queue...] and the indices of P(i) within it."""
    s = np.concatenate([[q[i] @ k[i]], q[i] @ queue]) / T
    positives = [0] + [1 + j for j in range(queue.shape[1]) if filled[j] and slot_labels[j] == labels[i]]
    return s, positives


def ref_in(q, k, queue, labels, slot_labels, filled):
    losses = []
    for i in range(len(q)):
        s, p = ref_key_terms(q, k, queue, labels, slot_labels, filled, i)
        losses.append(-(lse(s[p]) - np.log(len(p)) - lse(s)))
    return np.mean(losses)


def ref_out(q, k, queue, labels, slot_labels, filled):
    losses = []
    for i in range(len(q)):
        s, p = ref_key_terms(q, k, queue, labels, slot_labels, filled, i)
        losses.append(-np.mean(s[p] - lse(s)))
    return np.mean(losses)


def ref_suploss(q, k, queue, labels, slot_labels, filled):
    n = len(q)
    entries = np.concatenate([q, k, queue.T])
    entry_labels = np.concatenate([labels, labels, slot_labels])
    real = np.concatenate([np.ones(2 * n, bool), filled])
    losses = []
    for i in range(n):
        others = [j for j in range(len(entries)) if j != i]
        s = entries @ q[i] / T
        positives = [j for j in others if real[j] and entry_labels[j] == labels[i]]
        losses.append(-(T / BASE_T) * np.mean(s[positives] - lse(s[others])))
    return np.mean(losses)


VARIANTS = [(supcon_in, ref_in, {}), (supcon_out, ref_out, {}), (suploss, ref_suploss, {"base_T": BASE_T})]


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k = unit_rows(rng, len(LABELS), 5), unit_rows(rng, len(LABELS), 5)
    queue = unit_rows(rng, len(SLOT_LABELS), 5).T.copy()
    return q, k, queue


def as_tensors(q, k, queue, labels=LABELS, slot_labels=SLOT_LABELS, filled=FILLED):
    queue_labels = np.where(filled, slot_labels, EMPTY)
    return (paddle.to_tensor(q, stop_gradient=False), paddle.to_tensor(k), paddle.to_tensor(queue),
            paddle.to_tensor(labels), paddle.to_tensor(queue_labels))


# Catches: an empty slot counted as a positive (label queue filled with 0, or the marker not excluded),
# In and Out swapped, |P(i)| miscounted (e.g. without the own key), the own query not masked out of
# Suploss, Suploss without its T / base_T scale or over other anchors.
@pytest.mark.parametrize("loss_fn, reference, kwargs", VARIANTS)
def test_each_loss_equals_its_numpy_recomputation(loss_fn, reference, kwargs):
    for seed in range(3):
        q, k, queue = inputs(seed)
        got = float(loss_fn(*as_tensors(q, k, queue), T, **kwargs))
        np.testing.assert_allclose(got, reference(q, k, queue, LABELS, SLOT_LABELS, FILLED), rtol=1e-10)


# Catches: a gradient that differs from the formula's (masking that leaks through the backward pass).
@pytest.mark.parametrize("loss_fn, reference, kwargs", VARIANTS)
def test_each_gradient_equals_the_numpy_formulas_finite_differences(loss_fn, reference, kwargs):
    q, k, queue = inputs()
    q_t = as_tensors(q, k, queue)[0]
    loss_fn(q_t, *as_tensors(q, k, queue)[1:], T, **kwargs).backward()
    numeric = np.zeros_like(q)
    for index in np.ndindex(q.shape):
        step = np.zeros_like(q)
        step[index] = 1e-6
        numeric[index] = (reference(q + step, k, queue, LABELS, SLOT_LABELS, FILLED)
                          - reference(q - step, k, queue, LABELS, SLOT_LABELS, FILLED)) / 2e-6
    np.testing.assert_allclose(q_t.grad.numpy(), numeric, atol=1e-7)


def test_with_the_own_key_as_the_only_positive_in_and_out_are_infonce():
    q, k, queue = (paddle.to_tensor(a) for a in inputs())
    labels, empty = paddle.to_tensor(LABELS), paddle.full([len(SLOT_LABELS)], EMPTY, dtype="int64")
    expected = float(info_nce(q, k, queue, T)[0])
    assert float(supcon_in(q, k, queue, labels, empty, T)) == pytest.approx(expected, rel=1e-12)
    assert float(supcon_out(q, k, queue, labels, empty, T)) == pytest.approx(expected, rel=1e-12)


def test_positive_hit_rate_counts_the_candidates_above_the_best_positive():
    scores = paddle.to_tensor([[0.1, 0.9, 0.5, 0.3, 0.2, 0.0, 0.8],    # best positive 0.8: second
                               [0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4],    # own key only: rank 6
                               [0.2, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0]])   # tie with a negative: a hit
    positives = paddle.to_tensor([[1, 0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]]).astype("bool")
    acc1, acc5 = positive_hit_rate(scores, positives)
    assert float(acc1) == pytest.approx(100 / 3) and float(acc5) == pytest.approx(200 / 3)
    # with the own key as the only positive it is MoCo's accuracy of picking it
    rng = np.random.default_rng(4)
    logits = paddle.to_tensor(rng.standard_normal((32, 9)).astype("float32"))
    own = paddle.to_tensor(np.arange(9) == 0).unsqueeze(0).expand([32, 9])
    assert [float(a) for a in positive_hit_rate(logits, own)] == [
        float(a) for a in topk_accuracy(logits, paddle.zeros([32], dtype="int64"))]


def make(cls=SupConIn, **kw):
    paddle.seed(0)
    args = dict(base_encoder=TINY, projector={"hidden_dim": 16}, dim=8, K=16, m=0.0, T=T)
    if cls is SupConSuploss:
        args["base_T"] = BASE_T  # SupContrast's, so the references' scale T / BASE_T is not 1
    args.update(kw)
    module = cls(**args)
    module.train()
    return module


def batch(labels, seed=2):
    rng = np.random.default_rng(seed)
    views = [paddle.to_tensor(rng.standard_normal((len(labels), 3, 16, 16)).astype("float32")) for _ in range(2)]
    return [*views, paddle.to_tensor(np.asarray(labels))]


# Catches: a label queue that starts filled with 0 (every empty slot a positive of class 0).
def test_a_new_module_has_no_positive_but_the_own_key():
    for cls in (SupConIn, SupConOut):
        module = make(cls)
        assert module.queue_labels.numpy().tolist() == [EMPTY] * 16
        step = batch([0, 0, 0, 0])
        with paddle.no_grad():
            q, k = module.encode(step[0], step[1])
        out = module.training_step(step)
        assert float(out.loss) == pytest.approx(float(info_nce(q, k, module.queue, T)[0]), rel=1e-6)


# Catches: labels written to other columns than their keys, the pointer moved twice, labels of the
# previous step, and a wrapped queue that keeps stale labels.
def test_enqueue_writes_each_label_beside_its_key_and_wraps():
    module = make(K=8, dim=2)
    for step, labels in enumerate(([3, 1, 4], [1, 5, 9], [2, 6, 5])):
        module.after_step({"keys": paddle.full([3, 2], float(step + 1)), "labels": paddle.to_tensor(labels)})
    assert module.queue_labels.numpy().tolist() == [5, 1, 4, 1, 5, 9, 2, 6]
    np.testing.assert_array_equal(module.queue.numpy()[0], [3, 1, 1, 2, 2, 2, 3, 3])
    assert int(module.queue_ptr[0]) == 1


@pytest.mark.parametrize("cls", [SupConIn, SupConOut, SupConSuploss])
def test_the_step_matches_numpy_on_a_partly_filled_queue_and_trains_only_the_query_encoder(cls):
    """With m=0 the key encoder equals the query encoder, so q and k can be recomputed."""
    module = make(cls)
    module.after_step({"keys": F.normalize(paddle.randn([4, 8]), axis=1), "labels": paddle.to_tensor([0, 2, 0, 1])})
    labels = np.array([0, 1, 0, 5])
    step = batch(labels)
    queue, queue_labels = module.queue.numpy().astype("float64"), module.queue_labels.numpy()
    with paddle.no_grad():
        q = F.normalize(module.encoder_q(step[0]), axis=1).numpy().astype("float64")
        k = F.normalize(module.encoder_q(step[1]), axis=1).numpy().astype("float64")
    reference = {SupConIn: ref_in, SupConOut: ref_out, SupConSuploss: ref_suploss}[cls]
    out = module.training_step(step)
    expected = reference(q, k, queue, labels, queue_labels, np.arange(16) < 4)  # four keys enqueued
    assert float(out.loss) == pytest.approx(expected, rel=1e-4)
    np.testing.assert_array_equal(out.after_step["labels"].numpy(), labels)
    out.loss.backward()
    assert all(p.grad is None for p in module.encoder_k.parameters())
    assert module.queue.grad is None
    grads = [p.grad for p in module.trainable_parameters()]
    assert all(g is not None for g in grads) and float(paddle.abs(module.encoder_q.head[0].weight.grad).sum()) > 0
    assert {id(p) for p in module.trainable_parameters()} == {id(p) for p in module.encoder_q.parameters()
                                                              if not p.stop_gradient}


def test_the_label_queue_is_saved_and_restored_with_the_module():
    module = make(SupConOut)
    module.after_step({"keys": paddle.randn([4, 8]), "labels": paddle.to_tensor([4, 3, 2, 1])})
    state = module.state_dict()
    assert state["queue_labels"].numpy().tolist()[:5] == [4, 3, 2, 1, EMPTY]
    fresh = make(SupConOut)
    fresh.set_state_dict(state)
    np.testing.assert_array_equal(fresh.queue_labels.numpy(), module.queue_labels.numpy())
    assert int(fresh.queue_ptr[0]) == 4


def test_registered_names_labels_and_config_errors():
    for name, cls in (("MOCOSupConInModule", SupConIn), ("MOCOSupConOutModule", SupConOut),
                      ("MOCOSupConSuplossModule", SupConSuploss)):
        assert MODULES.get(name, "Model.module") is cls and cls.needs_labels
    assert not MoCo.needs_labels
    module = build_module({"module": "MOCOSupConSuplossModule", "model": {"base_encoder": TINY, "base_T": 0.1}})
    assert module.base_T == 0.1 and module.T == 0.07
    with pytest.raises(ConfigError, match=r"Model.model.base_T: unknown key"):
        build_module({"module": "MOCOSupConInModule", "model": {"base_encoder": TINY, "base_T": 0.1}})
    with pytest.raises(ConfigError, match=r"Model.model.base_T: 0 is out of range; it must be > 0"):
        build_module({"module": "MOCOSupConSuplossModule", "model": {"base_encoder": TINY, "base_T": 0}})
    # The seed builds SupLoss(temperature=T) with base_temperature None, which becomes T: the scale is
    # 1. Catches: a default of SupContrast's 0.07 (the loss 2.86x the seed's at T = 0.2).
    seed_like = build_module({"module": "MOCOSupConSuplossModule", "model": {"base_encoder": TINY, "T": 0.2}})
    assert seed_like.base_T == seed_like.T == 0.2


def test_key_log_probs_and_positives_put_the_own_key_first():
    q, k, queue = (paddle.to_tensor(a) for a in inputs())
    log_prob = key_log_probs(q, k, queue, T)
    np.testing.assert_allclose(log_prob.numpy(), F.log_softmax(info_nce(q, k, queue, T)[1], axis=1).numpy())
    positives = key_positives(paddle.to_tensor(LABELS), paddle.to_tensor(np.where(FILLED, SLOT_LABELS, EMPTY)))
    assert positives.numpy()[:, 0].all() and positives.numpy()[5].sum() == 1
