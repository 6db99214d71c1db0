"""Under `paddle.distributed.launch --nproc_per_node 2`: cached per-layer features of 7 samples on 2 ranks.

Called three times: the first call extracts (rank 0 writes the cache), the second must read it on both
ranks without either waiting for a gather the other skips, the third gives rank 1 a cache folder of its
own (nodes that do not share it), where both must extract. Each rank writes what the calls returned.
"""
import json
import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from ppmoco.data import build_dataloader  # noqa: E402
from ppmoco.eval.features import dataset_features  # noqa: E402

ROWS = np.arange(7 * 3, dtype="float32").reshape(7, 3, 1, 1)  # sample i's one-pixel, 3-channel map
LABELS = np.array([0, 1, 1, 0, 2, 2, 1], dtype="int64")


class Maps(paddle.io.Dataset):
    samples = [(f"img{i}.png", int(label)) for i, label in enumerate(LABELS)]

    def __len__(self):
        return len(LABELS)

    def __getitem__(self, i):
        return ROWS[i], LABELS[i]

    def set_epoch(self, epoch):
        pass


class Stages:
    calls = 0

    def extract_stages(self, images):
        Stages.calls += 1
        return [images] * 5


def main(out_dir):
    dist.init_parallel_env()
    weights = os.path.join(out_dir, "w.pdparams")
    if dist.get_rank() == 0:
        with open(weights, "w") as f:
            f.write("weights")
    dist.barrier()
    dataset = Maps()
    loader, sampler = build_dataloader(dataset, 2, 2, dist.get_rank(), False, False, 0)
    runs = []
    # Twice in one cache folder, then as on nodes that do not share it: rank 1's folder has no copy.
    for cache in ("cache", "cache", "cache" if dist.get_rank() == 0 else "cache_of_rank1"):
        Stages.calls = 0
        out = dataset_features(Stages(), (loader, sampler, dataset), ["gap", "feat5"], "test",
                               os.path.join(out_dir, cache), weights, {"name": "Maps"})
        runs.append({"gap": out["gap"].tolist(), "feat5": out["feat5"].tolist(), "labels": out["labels"].tolist(),
                     "paths": out["paths"].tolist(), "calls": Stages.calls})
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(runs, f)


if __name__ == "__main__":
    main(sys.argv[1])
