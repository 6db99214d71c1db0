import numpy as np
from PIL import Image

from ppmoco.data import build_dataloader, build_dataset


def test_workers_see_the_epoch_and_match_single_process(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        path = tmp_path / "train" / f"c{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
    cfg = {"name": "ContrastiveLearningDataset", "root": str(tmp_path / "train"), "transform_ops": [
        {"RandCropImage": {"size": 8}}, {"ColorJitter": {"brightness": 0.4, "hue": 0.1}},
        {"RandFlipImage": None}, {"NormalizeImage": None}, {"ToCHWImage": None}]}

    def run(num_workers, epochs=(0, 1), start_batch=0):
        dataset = build_dataset(cfg, "Data.Train.dataset", seed=7)
        loader, sampler = build_dataloader(dataset, 4, 1, 0, shuffle=True, drop_last=True, seed=7,
                                           num_workers=num_workers)
        batches = []
        for epoch in epochs:
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch, start_batch)
            batches += [[t.numpy() for t in batch] for batch in loader]
        return batches

    single, multi = run(0), run(2)
    assert len(single) == len(multi) == 6
    assert [b[0].shape for b in single] == [(4, 3, 8, 8)] * 6 and single[0][2].dtype == np.int64
    for a, b in zip(single, multi):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(single[0][0], single[3][0])  # epoch 1 differs from epoch 0
    resumed = run(2, epochs=(1,), start_batch=1)
    for a, b in zip(single[4:], resumed, strict=True):
        np.testing.assert_array_equal(a[1], b[1])
