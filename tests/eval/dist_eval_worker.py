"""Under `paddle.distributed.launch --nproc_per_node 2`: predict over 7 samples split over 2 ranks.

The sampler pads 7 samples to 8 (one duplicate); the gathered result must be the 7 samples in
dataset order, and the accuracy must count each sample once. It must be the same gathered in blocks of
one row (inference.GATHER_BYTES forced down: a large kNN bank is gathered in blocks).
"""
import json
import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from ppmoco.data import build_dataloader  # noqa: E402
from ppmoco.eval import inference  # noqa: E402
from ppmoco.eval.inference import predict_dataset  # noqa: E402
from ppmoco.metrics import numpy_topk_accuracy  # noqa: E402

# Per-sample logits over 6 classes and labels: top-1 right for samples 0, 2, 4, 6 (4/7),
# label within the top 5 for all but sample 5, whose label scores lowest (6/7).
LOGITS = np.array([[9, 1, 2, 3, 4, 5], [1, 9, 2, 3, 4, 5], [1, 2, 9, 3, 4, 5], [9, 1, 2, 3, 4, 5],
                   [1, 2, 3, 4, 9, 5], [9, 8, 7, 6, 5, 0], [1, 2, 3, 4, 5, 9]], dtype="float32")
LABELS = np.array([0, 2, 2, 2, 4, 5, 5], dtype="int64")


class Rows(paddle.io.Dataset):
    def __len__(self):
        return len(LABELS)

    def __getitem__(self, i):
        return LOGITS[i], LABELS[i]

    def set_epoch(self, epoch):
        pass


def main(out_dir):
    dist.init_parallel_env()
    dataset = Rows()
    loader, sampler = build_dataloader(dataset, 2, 2, dist.get_rank(), False, False, 0)
    out = predict_dataset(lambda b: {"logits": b[0], "labels": b[1]}, loader, sampler, dataset)
    metrics = numpy_topk_accuracy(out["logits"], out["labels"])
    inference.GATHER_BYTES = 1  # one row of every rank per all-gather: 4 gathers of the 4 rows a rank holds
    blocks = predict_dataset(lambda b: {"logits": b[0], "labels": b[1]}, loader, sampler, dataset)
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"logits": out["logits"].tolist(), "labels": out["labels"].tolist(),
                   "metrics": metrics, "blocks": {k: v.tolist() for k, v in blocks.items()}}, f)


if __name__ == "__main__":
    main(sys.argv[1])
