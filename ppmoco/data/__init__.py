"""Datasets, seeded augmentations and the resumable distributed loader."""
from ppmoco.data.cifar import Cifar10ClsDataset, Cifar10ContrastiveDataset
from ppmoco.data.datasets import DATASETS, build_dataset, decode_image, labelled_form, require_labels
from ppmoco.data.digits import build_digits
from ppmoco.data.loader import build_dataloader
from ppmoco.data.sampler import DistributedBatchSampler
from ppmoco.data.subsets import write_drawn_split
from ppmoco.data.transforms import TRANSFORMS, build_transforms
from ppmoco.data.voc import VOC07Dataset

__all__ = ["DATASETS", "TRANSFORMS", "Cifar10ClsDataset", "Cifar10ContrastiveDataset", "DistributedBatchSampler",
           "VOC07Dataset", "build_dataloader", "build_dataset", "build_digits", "build_transforms", "decode_image",
           "labelled_form", "require_labels", "write_drawn_split"]
