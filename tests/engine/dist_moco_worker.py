"""Run under `paddle.distributed.launch --nproc_per_node 2`: one MoCo step per rank, results to npz.

Each rank feeds its own batch, so the test can check the queue against the rank-ordered keys,
the cross-rank shuffle against its inverse, and the averaged gradients.
"""
import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from ppmoco.distributed import all_reduce_mean, batch_shuffle, batch_unshuffle  # noqa: E402
from ppmoco.modules.moco import MoCo  # noqa: E402

out_dir = sys.argv[1]
dist.init_parallel_env()
rank = dist.get_rank()
paddle.seed(0)
moco = MoCo(base_encoder={"name": "resnet18", "widths": [4, 8, 8, 8], "cifar_stem": True},
            projector={"hidden_dim": 16}, dim=8, K=16, m=0.9, T=0.2)
moco.train()
rng = np.random.default_rng(100 + rank)
im_q = paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype("float32"))
im_k = paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype("float32"))

x = paddle.to_tensor(np.arange(4, dtype="float32") + 10 * rank)
shuffled, undo = batch_shuffle(x)
restored = batch_unshuffle(shuffled, undo)

queue_before = moco.queue.numpy().copy()
captured = {}
original_enqueue = moco.enqueue


def spy(keys):
    captured["keys"] = keys.numpy().copy()
    original_enqueue(keys)


moco.enqueue = spy
out = moco.training_step([im_q, im_k])
out.loss.backward()
moco.after_step(out.after_step)  # enqueues this step's keys from every rank
grad = moco.encoder_q.head[0].weight.grad
local_grad = grad.numpy().copy()
all_reduce_mean([grad])
# Gradients of several dtypes, as O2 mixed precision leaves them (bfloat16 next to float32 norms).
mixed = [paddle.to_tensor([1.0 + rank, 3.0], dtype="float32"), paddle.to_tensor([2.0 * rank, 8.0], dtype="bfloat16"),
         paddle.to_tensor([[4.0 * rank]], dtype="float64")]
all_reduce_mean(mixed)
np.savez(os.path.join(out_dir, f"rank{rank}.npz"), mixed_f32=mixed[0].numpy(),
         mixed_bf16=mixed[1].astype("float32").numpy(), mixed_f64=mixed[2].numpy(),
         mixed_dtypes=np.array([str(t.dtype) for t in mixed]), keys=captured["keys"], queue=moco.queue.numpy(),
         queue_before=queue_before, ptr=moco.queue_ptr.numpy(), x=x.numpy(), shuffled=shuffled.numpy(),
         restored=restored.numpy(), loss=float(out.loss), local_grad=local_grad,
         mean_grad=grad.numpy())
