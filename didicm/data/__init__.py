"""Data sets, degradations and subsets for didicm.

``create_dataset(name, split, ...)`` builds a split of a named data set (see ``datasets``);
``parse_degradation(spec)`` builds a seeded, composable degradation (see ``degradations``);
``dataset_info(name)`` tells a model its number of classes, channels and input size without loading images.
"""

from .augment import BatchAugment, crop_padding, pixel_augment
from .base import (
    RATIO_RULES,
    VAL_SPLIT_SEED,
    ClassificationDataset,
    class_balanced_subset,
    official_ratio_subset,
    stratified_split,
)
from .datasets import (
    DEFAULT_VAL_SIZE,
    DEGRADATION_SEED,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    NORMALIZATION,
    SPLITS,
    DataSource,
    create_dataset,
    dataset_info,
    resolve_source,
)
from .degradations import (
    DEGRADATIONS,
    Degradation,
    DegradationPipeline,
    GaussianBlur,
    GaussianNoise,
    Jpeg,
    Resolution,
    parse_degradation,
)
from .folder import IMAGE_EXTENSIONS, BadImageWarning, FileList, FolderDataset, load_image
from .memory import InMemoryDataset
from .readers import RawSplit, find_idx_files, load_cifar_dir, load_digits_splits, load_idx_dir, read_idx
from .safe_pickle import safe_load, safe_loads

__all__ = [
    "BadImageWarning", "BatchAugment", "ClassificationDataset", "DEFAULT_VAL_SIZE", "DEGRADATION_SEED", "DEGRADATIONS",
    "DataSource", "FileList", "RATIO_RULES", "official_ratio_subset",
    "Degradation", "DegradationPipeline", "FASHION_MNIST_CLASSES", "FASHION_MNIST_ROOT", "FolderDataset",
    "GaussianBlur", "GaussianNoise", "IMAGE_EXTENSIONS", "InMemoryDataset", "Jpeg", "NORMALIZATION", "RawSplit",
    "Resolution", "SPLITS", "VAL_SPLIT_SEED", "class_balanced_subset", "create_dataset", "crop_padding",
    "dataset_info", "find_idx_files", "load_cifar_dir", "load_digits_splits", "load_idx_dir", "load_image",
    "parse_degradation", "pixel_augment", "read_idx", "resolve_source", "safe_load", "safe_loads",
    "stratified_split",
]
