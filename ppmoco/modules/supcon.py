"""Supervised-contrastive MoCo (MoCo v2 + SupContrast): with labels, every queued key of the query's
class is a positive as well as the query's own key.

The queue stores each key's label beside it (`queue_labels`, gathered across ranks like the keys and
written to the same columns, saved in checkpoints). A slot that holds no key yet carries EMPTY, which
equals no label: training labels are >= 0 (the datasets reject negative ones, and the Engine refuses
unlabelled data for a Module with `needs_labels`), so an empty slot is never a positive. Empty slots
still hold MoCo's random initial keys, which count as negatives as in MoCo.

With q_i, k_i unit features of image i's two views, queue keys a, s_ia = q_i.a / T,
A(i) = {k_i} U queue and P(i) = {k_i} U {queue keys with label y_i}:
- In:      L_i = -log( (1/|P(i)|) sum_{p in P(i)} e^{s_ip} / sum_{a in A(i)} e^{s_ia} )
- Out:     L_i = -(1/|P(i)|) sum_{p in P(i)} log( e^{s_ip} / sum_{a in A(i)} e^{s_ia} )
- Suploss: SupCon (Khosla et al. 2020) with the queries as anchors over C = this process's queries
           and keys and the queue, each query's own entry left out: A(i) = C \\ {q_i},
           P(i) = {c in A(i) with label y_i} (k_i always among them), and
           L_i = -(T / base_T) (1/|P(i)|) sum_{p in P(i)} log( e^{s_ip} / sum_{a in A(i)} e^{s_ia} ).
The loss is the mean of L_i over the process's batch (the Engine averages gradients over processes).
Keys and queue are detached: gradients reach the query encoder only (in Suploss also through the
other queries, which are contrast entries).
"""
import paddle
import paddle.nn.functional as F

from ppmoco.distributed import concat_all_gather
from ppmoco.errors import ConfigError
from ppmoco.modules.base import StepOutput
from ppmoco.modules.moco import MoCo, key_logits

EMPTY = -1  # the label of a queue slot that holds no key yet


def key_log_probs(q, k, queue, T):
    """[N, 1 + K] log( e^{s_ia} / sum_{a' in A(i)} e^{s_ia'} ) over A(i) = {k_i} U queue, own key first."""
    return F.log_softmax(key_logits(q, k, queue, T), axis=1)


def key_positives(labels, queue_labels):
    """[N, 1 + K] bool: the own key (column 0) and the queue slots holding a key of the query's label."""
    own = paddle.ones([labels.shape[0], 1], dtype="bool")
    return paddle.concat([own, labels.unsqueeze(1) == queue_labels.unsqueeze(0)], axis=1)


def _mean_over_positives(log_prob, positives):
    """Per row, the mean of `log_prob` over its positives (`where`, not a product: -inf * 0 is NaN)."""
    positive_sum = paddle.where(positives, log_prob, paddle.zeros_like(log_prob)).sum(axis=1)
    return positive_sum / positives.astype(log_prob.dtype).sum(axis=1)


def supcon_in(q, k, queue, labels, queue_labels, T):
    """In: the positives' probabilities averaged inside the log (module docstring)."""
    positives = key_positives(labels, queue_labels)
    log_prob = key_log_probs(q, k, queue, T)
    masked = paddle.where(positives, log_prob, paddle.full_like(log_prob, float("-inf")))
    log_mean = paddle.logsumexp(masked, axis=1) - paddle.log(positives.astype(log_prob.dtype).sum(axis=1))
    return -log_mean.mean()


def supcon_out(q, k, queue, labels, queue_labels, T):
    """Out: the positives' log-probabilities averaged outside the log (module docstring)."""
    return -_mean_over_positives(key_log_probs(q, k, queue, T), key_positives(labels, queue_labels)).mean()


def suploss(q, k, queue, labels, queue_labels, T, base_T):
    """Suploss: SupCon over this process's queries and keys and the queue, scaled by T / base_T
    (module docstring)."""
    n = q.shape[0]
    contrast = paddle.concat([q, k, queue.T], axis=0)
    contrast_labels = paddle.concat([labels, labels, queue_labels])
    # every entry but each query's own (query i is entry i)
    others = paddle.arange(n).unsqueeze(1) != paddle.arange(contrast.shape[0]).unsqueeze(0)
    logits = paddle.matmul(q, contrast, transpose_y=True) / T
    log_prob = F.log_softmax(paddle.where(others, logits, paddle.full_like(logits, float("-inf"))), axis=1)
    positives = (labels.unsqueeze(1) == contrast_labels.unsqueeze(0)) & others
    return -(T / base_T) * _mean_over_positives(log_prob, positives).mean()


def positive_hit_rate(scores, positives, ks=(1, 5)):
    """Percent of rows whose k best-scoring candidates hold a positive, for each k in `ks`.

    A row's hit rank is the number of candidates scoring above its best positive (a tie counts for
    the positive). With the own key as the only positive this is MoCo's top-k accuracy of picking it.
    """
    best = paddle.where(positives, scores, paddle.full_like(scores, float("-inf"))).max(axis=1, keepdim=True)
    ahead = (scores > best).astype("int64").sum(axis=1)
    return [(ahead < k).astype("float32").mean() * 100.0 for k in ks]


class SupConMoCo(MoCo):
    """MoCo whose queue keeps each key's label; a variant defines `loss(q, k, labels)` (the scalar loss
    of the batch's queries `q`, keys `k` and labels)."""

    needs_labels = True

    def __init__(self, base_encoder, projector=None, dim=128, K=65536, m=0.999, T=0.07, bn_splits=1):
        super().__init__(base_encoder, projector, dim, K, m, T, bn_splits)
        self.register_buffer("queue_labels", paddle.full([K], EMPTY, dtype="int64"))

    @paddle.no_grad()
    def enqueue(self, keys, labels):
        """MoCo's enqueue, with each key's label written to its column (gathered in the same rank order)."""
        labels = concat_all_gather(labels)
        columns = self.queue_columns(labels.shape[0])  # before MoCo's enqueue moves the pointer
        paddle.assign(paddle.scatter(self.queue_labels, columns, labels), output=self.queue_labels)
        super().enqueue(keys)

    def training_step(self, batch):
        labels = batch[-1]
        q, k = self.encode(batch[0], batch[1])
        loss = self.loss(q, k, labels)
        acc1, acc5 = positive_hit_rate(key_logits(q, k, self.queue.detach(), self.T),
                                       key_positives(labels, self.queue_labels))
        return StepOutput(loss, {"acc1": acc1, "acc5": acc5}, after_step={"keys": k, "labels": labels})


class SupConIn(SupConMoCo):
    """MoCo v2 + SupContrast, In variant (module docstring)."""

    def loss(self, q, k, labels):
        return supcon_in(q, k, self.queue.detach(), labels, self.queue_labels, self.T)


class SupConOut(SupConMoCo):
    """MoCo v2 + SupContrast, Out variant (module docstring)."""

    def loss(self, q, k, labels):
        return supcon_out(q, k, self.queue.detach(), labels, self.queue_labels, self.T)


class SupConSuploss(SupConMoCo):
    """MoCo v2 + SupContrast, Suploss variant (module docstring). `base_T` is SupContrast's
    base_temperature; None (the default) is T itself, as the seed builds its loss (the scale T / base_T
    is then 1); SupContrast's own default is 0.07."""

    def __init__(self, base_encoder, projector=None, dim=128, K=65536, m=0.999, T=0.07, bn_splits=1,
                 base_T=None):
        base_T = T if base_T is None else base_T
        if not base_T > 0:
            raise ConfigError(f"Model.model.base_T: {base_T} is out of range; it must be > 0 (or null: T)")
        super().__init__(base_encoder, projector, dim, K, m, T, bn_splits)
        self.base_T = base_T

    def loss(self, q, k, labels):
        return suploss(q, k, self.queue.detach(), labels, self.queue_labels, self.T, self.base_T)
