"""The digit-image task (spec §5): pairs of handwritten digits 0-7 through a Boolean circuit.

Each digit d is coded as 3 bits, most significant first; a pair of images (a, b) has the
6 bits `bits(a) ++ bits(b)` and the target of the `[6,3,2,2]` circuit: XOR(a_i, b_i) for
i = 0, 1, 2 (routing `[[0,3],[1,4],[2,5]]`), then AND of the XOR pairs (0,1), (1,2).

The 64 ordered digit pairs are split by seed into training, validation and unseen test
pairs (`tasks.split_rows`: 51/6/7 at train_fraction 0.8). Training rows draw training images
of training pairs; every evaluation split draws held-out images. Splits:

- `train`: training pairs, training images;
- `val`: validation pairs (never trained on), held-out images;
- `test_seen`: training pairs, held-out images (new images of seen pairs);
- `test_unseen`: unseen test pairs, held-out images (compositional generalisation);
  `test` is the same rows, so every task reports train/val/test/heldout;
- `heldout`: val + test_unseen, every pair never trained on (13 pairs instead of 6-7).

Images are one tensor [images, H, W] in [0, 1]; rows are pairs of image indices, and `x[idx]`
gathers the images on the device (`PairImages`). Data: scikit-learn's bundled 8x8 digits
(`source=digits`, a seeded image split) or MNIST IDX files in `root` (`source=mnist`, the
official train / t10k images), never downloaded.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from modnets.circuits import circuit
from modnets.config import ConfigError, check
from modnets.tasks import Task, split_rows

# spec §5: XORs of the two codes bit by bit, then ANDs of neighbouring XORs.
CIRCUIT = circuit(6, [("XOR", (0, 3)), ("XOR", (1, 4)), ("XOR", (2, 5))], [("AND", (0, 1)), ("AND", (1, 2))])
DIGITS = 8  # digits 0-7: 3 bits each
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def bits(digits: np.ndarray) -> np.ndarray:
    """3-bit codes [n, 3], most significant bit first."""
    d = np.asarray(digits)[:, None]
    return (d >> np.array([2, 1, 0])) & 1


def pair_labels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Targets [n, 2] of digit pairs (a, b): the circuit on `bits(a) ++ bits(b)`."""
    return CIRCUIT.evaluate(np.concatenate([bits(a), bits(b)], 1))


class PairImages:
    """Rows of image pairs stored as image indices; `x[idx]` is `images[pairs[idx]]`, shape
    [*idx.shape, 2, H, W]. Quacks like the tensor the trainer indexes (shape, len, device, to)."""

    def __init__(self, images: torch.Tensor, pairs: torch.Tensor):
        self.images, self.pairs = images, pairs  # [n_images, H, W] float, [rows, 2] long

    def __getitem__(self, idx):
        return self.images[self.pairs[idx]]

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.pairs.shape, *self.images.shape[1:]))

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device) -> PairImages:
        return PairImages(self.images.to(device), self.pairs.to(device))


def read_idx(path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not: magic 0 0 type ndim, big-endian sizes, data."""
    try:
        data = Path(path).read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # unreadable, truncated or corrupted gzip
        problem = "a truncated gzip file" if isinstance(e, EOFError) else "unreadable"
        raise ConfigError("task.root", str(path), f"an IDX file, gzipped or not; this one is {problem} ({e})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_TYPES:
        raise ConfigError("task.root", str(path), "an IDX file (magic bytes 0 0 type ndim)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ConfigError("task.root", str(path), f"an IDX file; its header promises {ndim} sizes the file does not hold")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(IDX_TYPES[data[2]])
    count = int(np.prod(dims))
    if len(data) != 4 + 4 * ndim + count * dtype.itemsize:
        raise ConfigError("task.root", str(path), f"an IDX file of {count} values of shape {list(dims)} (wrong size)")
    return np.frombuffer(data, dtype, count=count, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(root) -> dict[str, np.ndarray]:
    """The four MNIST IDX files in `root` (each NAME or NAME.gz), keyed as MNIST_FILES."""
    folder = Path(str(root)).expanduser()
    found, missing = {}, []
    for key, name in MNIST_FILES.items():
        paths = [p for p in (folder / name, folder / f"{name}.gz") if p.is_file()]
        if paths:
            found[key] = paths[0]
        else:
            missing.append(name)
    if missing:
        names = ", ".join(f"{n}[.gz]" for n in MNIST_FILES.values())
        raise ConfigError(
            "task.root", str(root), f"a folder holding the MNIST files {names}; {folder.resolve()} lacks {', '.join(missing)}"
            " (modnets does not download: fetch them and pass task.root=FOLDER)",
        )
    data = {key: read_idx(path) for key, path in found.items()}
    check_mnist(data, found, folder)
    return data


def check_mnist(data: dict[str, np.ndarray], paths: dict[str, Path], folder: Path) -> None:
    """Images [n, H, W] of one size, labels [n], as many labels as images in each split."""
    for split in ("train", "test"):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        image_path, label_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        check(images.ndim == 3, "task.root", str(image_path), f"images [n, H, W]; this file holds {list(images.shape)}")
        check(labels.ndim == 1, "task.root", str(label_path), f"labels [n]; this file holds {list(labels.shape)}")
        counts = f"{image_path.name} has {len(images)} images and {label_path.name} {len(labels)} labels"
        check(len(images) == len(labels), "task.root", str(folder), f"as many labels as images; {counts}")
    shapes = {key: list(data[key].shape[1:]) for key in ("train_images", "test_images")}
    check(shapes["train_images"] == shapes["test_images"], "task.root", str(folder), f"images of one size, not {shapes}")


def load_images(source: str, root, image_train_fraction: float, seed: int):
    """Images [n, H, W] in [0, 1], labels [n], and a boolean [n] marking training images."""
    if source == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ConfigError("task.source", source, "scikit-learn installed (pip install 'modnets[digits]')") from None
        check(0 < image_train_fraction < 1, "task.image_train_fraction", image_train_fraction, "a fraction in (0, 1)")
        d = load_digits()
        images, labels = d.images.astype(np.float32) / np.float32(16), d.target
        rng = np.random.default_rng(seed)
        train = np.zeros(len(labels), dtype=bool)
        for digit in range(10):  # the same fraction of every digit's images
            rows = rng.permutation(np.flatnonzero(labels == digit))
            train[rows[: int(len(rows) * image_train_fraction)]] = True
        return images, labels, train
    if source == "mnist":
        check(root is not None, "task.root", root, "the folder of the MNIST IDX files")
        m = load_mnist(root)
        images = np.concatenate([m["train_images"], m["test_images"]]).astype(np.float32) / np.float32(255)
        labels = np.concatenate([m["train_labels"], m["test_labels"]])
        train = np.arange(len(labels)) < len(m["train_labels"])
        return images, labels, train
    raise ConfigError("task.source", source, "digits (scikit-learn 8x8) or mnist (IDX files in task.root)")


def sample_pairs(pools: list[np.ndarray], pairs: np.ndarray, per_pair: int, rng) -> np.ndarray:
    """`per_pair` rows [image of a, image of b] for each digit pair (a, b), drawn with replacement."""
    return np.concatenate([np.stack([rng.choice(pools[a], per_pair), rng.choice(pools[b], per_pair)], 1) for a, b in pairs])


def DigitPairTask(
    source: str = "digits",
    root: str | None = None,
    train_fraction: float = 0.8,
    split_seed: int = 40,
    samples_per_pair_train: int = 100,
    samples_per_pair_test: int = 50,
    image_train_fraction: float = 0.6,
    noise: float = 0.0,
) -> Task:
    """The digit-pair task of spec §5 (see the module docstring for its splits)."""
    check(int(samples_per_pair_train) >= 1, "task.samples_per_pair_train", samples_per_pair_train, "an integer >= 1")
    check(int(samples_per_pair_test) >= 1, "task.samples_per_pair_test", samples_per_pair_test, "an integer >= 1")
    images, labels, train_image = load_images(source, root, image_train_fraction, split_seed)
    keep = labels < DIGITS
    images, labels, train_image = images[keep], labels[keep], train_image[keep]
    pools = {
        split: [np.flatnonzero((labels == d) & (train_image == (split == "train"))) for d in range(DIGITS)]
        for split in ("train", "heldout")
    }
    for split, per_digit in pools.items():
        for d, pool in enumerate(per_digit):
            check(len(pool) > 0, "task.source", source, f"data with {split} images of every digit 0-7 (none of {d})")
    all_pairs = np.array([(a, b) for a in range(DIGITS) for b in range(DIGITS)])
    by_pairs = split_rows(len(all_pairs), train_fraction, split_seed)  # pair ids: train / val / test
    rng = np.random.default_rng(split_seed)
    n_train, n_test = int(samples_per_pair_train), int(samples_per_pair_test)
    train_pairs = all_pairs[by_pairs["train"].numpy()]
    rows = [sample_pairs(pools["train"], train_pairs, n_train, rng), sample_pairs(pools["heldout"], all_pairs, n_test, rng)]
    digit_rows = np.concatenate([np.repeat(train_pairs, n_train, 0), np.repeat(all_pairs, n_test, 0)])
    offset = len(train_pairs) * n_train  # evaluation rows: pair p holds rows offset + p * n_test + [0, n_test)

    def eval_rows(pair_ids: torch.Tensor) -> torch.Tensor:
        return (offset + pair_ids[:, None] * n_test + torch.arange(n_test)).flatten()

    splits = {
        "train": torch.arange(offset),
        "val": eval_rows(by_pairs["val"]),
        "test_seen": eval_rows(by_pairs["train"]),
        "test_unseen": eval_rows(by_pairs["test"]),
    }
    splits["test"] = splits["test_unseen"]
    splits["heldout"] = torch.cat([splits["val"], splits["test_unseen"]])
    x = PairImages(torch.from_numpy(images), torch.from_numpy(np.concatenate(rows)).long())
    y = torch.from_numpy(pair_labels(digit_rows[:, 0], digit_rows[:, 1])).float()
    task = Task(x, y, torch.zeros(len(y), dtype=torch.long), splits, [CIRCUIT], noise, source)
    task.digits = torch.from_numpy(digit_rows)  # [rows, 2] the digits of each row (for checks and analysis)
    task.image_labels, task.train_images = torch.from_numpy(labels), torch.from_numpy(train_image)  # per image
    task.pair_split = {k: all_pairs[v.numpy()] for k, v in by_pairs.items()}  # digit pairs of train / val / test
    return task
