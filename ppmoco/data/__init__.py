"""Datasets, seeded augmentations and the resumable distributed loader."""
from ppmoco.data.datasets import DATASETS, build_dataset, decode_image, require_labels
from ppmoco.data.digits import build_digits
from ppmoco.data.loader import build_dataloader
from ppmoco.data.sampler import DistributedBatchSampler
from ppmoco.data.transforms import TRANSFORMS, build_transforms

__all__ = ["DATASETS", "TRANSFORMS", "DistributedBatchSampler", "build_dataloader", "build_dataset",
           "build_digits", "build_transforms", "decode_image", "require_labels"]
