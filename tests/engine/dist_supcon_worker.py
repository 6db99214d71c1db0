"""Run under `paddle.distributed.launch --nproc_per_node 2`: one supervised-contrastive MoCo step per
rank, each with its own images and labels; the queue and label queue after the enqueue go to npz."""
import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from ppmoco.modules.supcon import SupConIn  # noqa: E402

out_dir = sys.argv[1]
dist.init_parallel_env()
rank = dist.get_rank()
paddle.seed(0)
module = SupConIn(base_encoder={"name": "resnet18", "widths": [4, 8, 8, 8], "cifar_stem": True},
                  projector={"hidden_dim": 16}, dim=8, K=16, m=0.9, T=0.2)
module.train()
rng = np.random.default_rng(100 + rank)
views = [paddle.to_tensor(rng.standard_normal((4, 3, 16, 16)).astype("float32")) for _ in range(2)]
labels = np.arange(4) + 4 * rank  # rank 0: 0..3, rank 1: 4..7
out = module.training_step([*views, paddle.to_tensor(labels)])
out.loss.backward()
module.after_step(out.after_step)
np.savez(os.path.join(out_dir, f"rank{rank}.npz"), keys=out.after_step["keys"].numpy(),
         queue=module.queue.numpy(), queue_labels=module.queue_labels.numpy(), ptr=module.queue_ptr.numpy())
