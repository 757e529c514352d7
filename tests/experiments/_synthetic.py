"""Small synthetic stand-ins for the experiments' data sets, written in their real file formats.

The experiment tests run on these instead of the real MNIST, bAbI and tiny-shakespeare (which a fresh
clone does not have and the tests must not download). Each writer returns what it wrote, so tests
compare the loaders' output with the generator's own arrays and strings, never with the loader's.

* MNIST-like digits: 28x28 uint8 images of class-dependent strokes plus noise, written as gzip IDX
  (magic 2051 for images, 2049 for labels, big-endian dimensions) under MNIST's file names.
* bAbI QA1-like stories: "Mary went to the kitchen." / "Where is Mary?<TAB>kitchen<TAB>1", in blocks of
  two statements and a question, five blocks per story, line ids restarting at 1 for each story.
* Text: sentences drawn from a small word list, for the character language model.

Nothing here imports ftmlopt.
"""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
BABI_TRAIN = "qa1_single-supporting-fact_train.txt"
BABI_TEST = "qa1_single-supporting-fact_test.txt"
PEOPLE = ("Mary", "John", "Sandra", "Daniel")
PLACES = ("bathroom", "hallway", "garden", "office", "kitchen", "bedroom")
VERBS = ("moved to", "went to", "journeyed to", "travelled to", "went back to")


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """IDX: magic (0, 0, dtype code 0x08 = uint8, ndim), then each dimension as big-endian uint32, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images ``(n, 28, 28) uint8`` and labels ``(n,) uint8``: class c is a horizontal stroke at
    row 4 + 2c and a vertical one at column 22 - 2c, shifted by up to one pixel, plus noise. Every
    image holds a 0 and a 255."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.int32)
    shift = rng.integers(-1, 2, size=(n, 2))
    idx = np.arange(n)[:, None]
    span = np.arange(3, 25)[None, :]
    images[idx, (4 + 2 * labels.astype(np.int64) + shift[:, 0])[:, None], span] += 200
    images[idx, span, (22 - 2 * labels.astype(np.int64) + shift[:, 1])[:, None]] += 200
    out = np.clip(images, 0, 255).astype(np.uint8)
    out[:, 0, 0], out[:, 14, 12] = 0, 255
    return out, labels


@dataclass
class Mnist:
    train: tuple[np.ndarray, np.ndarray] | None
    test: tuple[np.ndarray, np.ndarray]


def write_mnist(folder: Path, n_train: int | None, n_test: int, seed: int = 0) -> Mnist:
    """MNIST's four files in ``folder`` (only the two ``t10k`` ones when ``n_train`` is None)."""
    test = digits(n_test, seed + 1)
    train = digits(n_train, seed) if n_train is not None else None
    for split, arrays in (("train", train), ("t10k", test)):
        if arrays is not None:
            for name, arr in zip(MNIST_FILES[split], arrays):
                write_idx_gz(folder / name, arr)
    return Mnist(train, test)


def babi_lines(n_stories: int, seed: int) -> list[str]:
    """QA1-style lines; a question asks where someone mentioned in its story is, answered by their last move."""
    rng = np.random.default_rng(seed)
    lines: list[str] = []
    for _ in range(n_stories):
        where: dict[str, tuple[str, int]] = {}
        ident = 0
        for _ in range(5):
            for _ in range(2):
                ident += 1
                who, verb, place = (str(rng.choice(options)) for options in (PEOPLE, VERBS, PLACES))
                where[who] = (place, ident)
                lines.append(f"{ident} {who} {verb} the {place}.")
            ident += 1
            who = str(rng.choice(sorted(where)))
            place, support = where[who]
            lines.append(f"{ident} Where is {who}? \t{place}\t{support}")
    return lines


def write_babi(folder: Path, n_train_stories: int = 130, n_test_stories: int = 20, seed: int = 0) -> dict[str, str]:
    """The two QA1 files (five questions per story); returns their texts by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = {
        BABI_TRAIN: "\n".join(babi_lines(n_train_stories, seed)) + "\n",
        BABI_TEST: "\n".join(babi_lines(n_test_stories, seed + 1)) + "\n",
    }
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    return texts


def text(n_chars: int, seed: int = 0) -> str:
    """About ``n_chars`` characters of lines made from a small word list, ending with a newline."""
    rng = np.random.default_rng(seed)
    words = "the moving leader follows a gradient with weight and step; so said we: all, then none!".split()
    out: list[str] = []
    size = 0
    while size < n_chars:
        line = " ".join(str(w) for w in rng.choice(words, size=int(rng.integers(3, 12)))).capitalize() + "\n"
        out.append(line)
        size += len(line)
    return "".join(out)


def write_text(folder: Path, n_chars: int = 24_000, seed: int = 0) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    body = text(n_chars, seed)
    (folder / "input.txt").write_text(body, encoding="utf-8")
    return body


@dataclass
class DataRoot:
    """A folder laid out as ``--data`` / ``$FTMLOPT_DATA`` expect, and what was written into it."""

    root: Path
    mnist: Mnist  # root/mnist: train (1,000 images) and test (10,000) files
    mnist10k: Mnist  # root/mnist10k: the test files alone, like a test-split-only copy
    babi: dict[str, str]
    text: str


def write_data_root(root: Path) -> DataRoot:
    mnist = write_mnist(root / "mnist", n_train=1000, n_test=10_000)
    (root / "mnist10k").mkdir()
    for name in MNIST_FILES["t10k"]:
        shutil.copyfile(root / "mnist" / name, root / "mnist10k" / name)
    mnist10k = Mnist(None, mnist.test)
    return DataRoot(root, mnist, mnist10k, write_babi(root / "babi-qa1"), write_text(root / "tinyshakespeare"))
