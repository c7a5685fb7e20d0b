"""Write a small image set as a folder of PNGs in ImageNet layout (OUT/train/<class>/*.png, OUT/test/<class>/*.png),
to try `didicm train --dataset folder:OUT` without images of your own.

    python scripts/png_folder.py OUT [--dataset fashion-mnist|digits] [--per-class N]
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from didicm.data import FASHION_MNIST_CLASSES, resolve_source
from didicm.data.readers import load_digits_splits, load_idx_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    parser.add_argument("--per-class", type=int, default=600, help="training images per class (test: a sixth)")
    args = parser.parse_args()
    if args.dataset == "digits":
        splits, names = load_digits_splits(), [str(i) for i in range(10)]
    else:
        splits = load_idx_dir(resolve_source("fashion-mnist").root)
        names = [name.replace("/", "_") for name in FASHION_MNIST_CLASSES]  # "T-shirt/top" is not a folder name
    for split, per_class in (("train", args.per_class), ("test", max(1, args.per_class // 6))):
        images, labels = splits[split].images, splits[split].labels
        for k, name in enumerate(names):
            folder = Path(args.out) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(labels == k)[:per_class]:
                Image.fromarray(images[i, 0]).save(folder / f"{i}.png")
    print(f"wrote {sum(1 for _ in Path(args.out).rglob('*.png'))} PNGs under {args.out}")


if __name__ == "__main__":
    main()
