"""Data for the experiments: one loader per data set, over :mod:`ftmlopt.datasets`.

Everything here is NumPy (plus scikit-learn for the bundled digits), so the loaders can be tested
without a deep-learning framework. Each file-backed loader takes ``data``: a folder (``--data DIR``),
a :class:`ftmlopt.datasets.DataFiles` from :func:`ftmlopt.datasets.fetch`, or None to find the data
set in ``$FTMLOPT_DATA``, the per-user cache, or else download it (checksum-checked). To record which
data a run used, fetch first and keep the provenance::

    files = resolve_data(args.data, "mnist")   # or ftmlopt.datasets.fetch("mnist", args.data)
    x_train, y_train, x_test, y_test = load_mnist(files)
    result["data"] = files.provenance            # a JSON-ready dict; describe() gives one line

* MNIST: :func:`load_mnist` gives the paper's 60,000 / 10,000 split. With only the 10,000-image test
  split present (``t10k-*`` files alone) it splits those 8,000 / 2,000 with a fixed permutation (seed 0,
  :func:`split_mnist10k`), warns, and the provenance says so. :func:`load_mnist10k` reads the test split.
* ``babi-qa1``: bAbI task 1, en-10k (10,000 training and 1,000 test questions). :func:`parse_babi`
  parses the line format, :func:`vectorize_babi` turns it into padded index arrays the way Keras'
  ``babi_memnn`` example does (stories and questions left-padded with 0, answers as word indices).
* ``tinyshakespeare/input.txt``: 1,115,394 characters. :func:`load_tinyshakespeare` maps it to
  integer codes over its sorted character set.
* :func:`make_timeseries`: the paper's synthetic series (§4.6), generated in code.
* :func:`load_digits_split`: scikit-learn's bundled 8×8 digits (no files needed), for the demo.

Example:
    >>> import numpy as np
    >>> from ftmlopt.experiments.data import make_timeseries
    >>> x = make_timeseries(seed=0, changing=True)
    >>> x.shape, x.dtype
    ((1000, 10), dtype('float32'))
"""

from __future__ import annotations

import gzip
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ftmlopt.experiments.datasets import DATA_ENV, DataFiles, fetch

__all__ = [
    "DATA_ENV", "BabiArrays", "BabiQuestion", "MnistSplits", "babi_vocab", "load_babi", "load_digits_split",
    "load_mnist", "load_mnist10k", "load_tinyshakespeare", "make_timeseries", "parse_babi", "resolve_data",
    "resolve_data_dir",
    "split_mnist10k", "tokenize", "vectorize_babi",
]

#: a data argument: a folder, what :func:`ftmlopt.datasets.fetch` returned, or None (env, cache, download)
DataArg = str | os.PathLike[str] | DataFiles | None

#: the folder names the tasks used for each data set, mapped to the data set
_SUBDIRS = {"mnist10k": "mnist", "mnist": "mnist", "babi-qa1": "babi-qa1", "tinyshakespeare": "tinyshakespeare"}


def _files(dataset: str, data: DataArg) -> DataFiles:
    return data if isinstance(data, DataFiles) else fetch(dataset, data)


def resolve_data(data: str | os.PathLike[str] | None, subdir: str) -> DataFiles:
    """One data set (``subdir``: ``mnist10k``/``mnist``, ``babi-qa1``, ``tinyshakespeare``) with its provenance.

    ``data`` if it holds the files (or a subfolder named ``subdir`` that does), else ``$FTMLOPT_DATA``,
    the per-user cache, or a download (:func:`ftmlopt.datasets.fetch`). Raises
    :class:`FileNotFoundError` (naming the folder, ``--data`` and the URLs tried) when none works.
    Pass the result to the loaders, and record its ``provenance`` dict in the run's JSON.
    """
    if subdir not in _SUBDIRS:
        raise ValueError(f"unknown data folder {subdir!r}; known: {', '.join(_SUBDIRS)}")
    if data is not None and not Path(data).is_dir():
        raise FileNotFoundError(f"data folder {str(data)!r} does not exist (--data DIR)")
    return fetch(_SUBDIRS[subdir], data)


def resolve_data_dir(data: str | os.PathLike[str] | None, subdir: str) -> Path:
    """The folder of :func:`resolve_data` (same arguments, same errors)."""
    return resolve_data(data, subdir).folder


# --------------------------------------------------------------------------------------------- MNIST
def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: IDX magic number {got}, expected {magic}")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} bytes of data for shape {dims}")
    return data.reshape(dims)


def _read_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051)
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels in {folder} ({prefix})")
    return images, labels


def load_mnist10k(folder: DataArg = None) -> tuple[np.ndarray, np.ndarray]:
    """Read the MNIST 10k test split: images ``(10000, 28, 28) uint8`` and labels ``(10000,) uint8``."""
    return _read_pair(_files("mnist", folder).folder, "t10k")


class MnistSplits(NamedTuple):
    """Training and held-out MNIST: images ``(n, 1, 28, 28)`` float32 in [0, 1], labels int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_mnist(data: DataArg = None, *, seed: int = 0) -> MnistSplits:
    """MNIST as the paper used it: the 60,000 training images and the 10,000 test images held out.

    When only the test split is present (a folder with just the ``t10k-*`` files), it is split
    8,000 / 2,000 by :func:`split_mnist10k` (permutation seed ``seed``) and a :class:`UserWarning` says
    so, as does the provenance of :func:`ftmlopt.datasets.fetch` (its ``note``). The full set's order
    is kept as published.
    """
    files = _files("mnist", data)
    if files.has("train-images-idx3-ubyte.gz") and files.has("train-labels-idx1-ubyte.gz"):
        (xtr, ytr), (xte, yte) = _read_pair(files.folder, "train"), _read_pair(files.folder, "t10k")

        def scale(x: np.ndarray) -> np.ndarray:
            return (x.astype(np.float32) / 255.0)[:, None]

        return MnistSplits(scale(xtr), ytr.astype(np.int64), scale(xte), yte.astype(np.int64))
    warnings.warn(
        f"MNIST: only the 10,000-image test split found in {files.folder}; training on 8,000 of it and "
        "holding out 2,000 (the paper trained on the 60,000 training images)",
        UserWarning,
        stacklevel=2,
    )
    return MnistSplits(*split_mnist10k(*_read_pair(files.folder, "t10k"), seed=seed))


def split_mnist10k(
    images: np.ndarray, labels: np.ndarray, n_train: int = 8000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split with a fixed permutation (``np.random.default_rng(seed)``): train first, held-out after.

    Images come back as float32 in [0, 1] with a channel axis, ``(n, 1, 28, 28)``; labels as int64.
    """
    perm = np.random.default_rng(seed).permutation(len(images))
    x = (images[perm].astype(np.float32) / 255.0)[:, None]
    y = labels[perm].astype(np.int64)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


# ---------------------------------------------------------------------------------------------- bAbI
BABI_TRAIN = "qa1_single-supporting-fact_train.txt"
BABI_TEST = "qa1_single-supporting-fact_test.txt"


@dataclass(frozen=True)
class BabiQuestion:
    """One bAbI question with the story told so far (story sentences in order, questions excluded)."""

    story: tuple[tuple[str, ...], ...]
    question: tuple[str, ...]
    answer: str
    supporting: tuple[int, ...]


def tokenize(sentence: str) -> list[str]:
    """Split into words and punctuation, case kept: ``"Where is Mary?"`` -> ``['Where', 'is', 'Mary', '?']``."""
    return [tok.strip() for tok in re.split(r"(\W+)", sentence) if tok.strip()]


def parse_babi(lines: list[str] | str) -> list[BabiQuestion]:
    """Parse bAbI's line format.

    A story line is ``ID text``; a question line is ``ID question<TAB>answer<TAB>supporting ids``; ID 1
    starts a new story. Each question gets every story sentence seen so far in its story; supporting
    ids are line ids, as in the file.

    Example:
        >>> from ftmlopt.experiments.data import parse_babi
        >>> qs = parse_babi("1 Mary went home.\\n2 Where is Mary?\\thome\\t1\\n")
        >>> qs[0].answer, qs[0].question, qs[0].story
        ('home', ('Where', 'is', 'Mary', '?'), (('Mary', 'went', 'home', '.'),))
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    out: list[BabiQuestion] = []
    story: list[tuple[str, ...]] = []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        ident, _, text = line.partition(" ")
        if not ident.isdigit():
            raise ValueError(f"bAbI line {lineno}: expected 'ID text', got {line!r}")
        if int(ident) == 1:
            story = []
        if "\t" in text:
            parts = text.split("\t")
            if len(parts) < 2:
                raise ValueError(f"bAbI line {lineno}: question without an answer: {line!r}")
            support = tuple(int(s) for s in parts[2].split()) if len(parts) > 2 else ()
            out.append(BabiQuestion(tuple(story), tuple(tokenize(parts[0])), parts[1].strip(), support))
        else:
            story.append(tuple(tokenize(text)))
    return out


def load_babi(folder: DataArg = None) -> tuple[list[BabiQuestion], list[BabiQuestion]]:
    """Parse the QA1 training (10,000 questions) and test (1,000 questions) files."""
    path = _files("babi-qa1", folder).folder
    train, test = (parse_babi((path / name).read_text(encoding="utf-8")) for name in (BABI_TRAIN, BABI_TEST))
    return train, test


@dataclass(frozen=True)
class BabiArrays:
    """Index arrays for the memory network; index 0 is padding, words are numbered from 1 in sorted order."""

    vocab: tuple[str, ...]
    stories: np.ndarray  # (n, story_maxlen) int64, left-padded
    questions: np.ndarray  # (n, query_maxlen) int64, left-padded
    answers: np.ndarray  # (n,) int64 word index


def vectorize_babi(
    data: list[BabiQuestion], vocab: tuple[str, ...], story_maxlen: int, query_maxlen: int
) -> BabiArrays:
    """Flatten each story into one word sequence and left-pad (truncating from the left) to fixed lengths."""
    index = {w: i + 1 for i, w in enumerate(vocab)}

    def pad(seqs: list[list[int]], maxlen: int) -> np.ndarray:
        arr = np.zeros((len(seqs), maxlen), dtype=np.int64)
        for i, s in enumerate(seqs):
            s = s[-maxlen:]
            if s:
                arr[i, maxlen - len(s) :] = s
        return arr

    stories = pad([[index[w] for sent in q.story for w in sent] for q in data], story_maxlen)
    questions = pad([[index[w] for w in q.question] for q in data], query_maxlen)
    answers = np.array([index[q.answer] for q in data], dtype=np.int64)
    return BabiArrays(vocab, stories, questions, answers)


def babi_vocab(*datasets: list[BabiQuestion]) -> tuple[tuple[str, ...], int, int]:
    """Sorted vocabulary over stories, questions and answers; the longest flattened story and question."""
    words: set[str] = set()
    story_max = query_max = 0
    for data in datasets:
        for q in data:
            flat = [w for sent in q.story for w in sent]
            words.update(flat, q.question, [q.answer])
            story_max = max(story_max, len(flat))
            query_max = max(query_max, len(q.question))
    return tuple(sorted(words)), story_max, query_max


# ---------------------------------------------------------------------------------- tiny-shakespeare
def load_tinyshakespeare(folder: DataArg = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Return the text as int64 codes over its sorted character set, and that character set."""
    text = (_files("tinyshakespeare", folder).folder / "input.txt").read_text(encoding="utf-8")
    chars = tuple(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(chars)}
    return np.fromiter((lookup[c] for c in text), dtype=np.int64, count=len(text)), chars


# --------------------------------------------------------------------------------------- time series
def make_timeseries(
    seed: int, changing: bool = True, length: int = 1000, segment: int = 50, dim: int = 10
) -> np.ndarray:
    """The synthetic series of the paper's §4.6, shape ``(length, dim)`` float32.

    In segment ``i`` (``segment`` steps each, i = 1, 2, ...) samples are ``N(m_i, I)`` plus ``N(0, I)`` noise,
    with ``m_i = [i, ..., i] + zeta_i`` and ``zeta_i ~ N(0, I)`` drawn once per segment. The stationary
    control (``changing=False``) uses ``m_i = [1, ..., 1]`` in every segment.
    """
    rng = np.random.default_rng(seed)
    n_seg = -(-length // segment)
    if changing:
        means = np.arange(1, n_seg + 1, dtype=np.float64)[:, None] + rng.standard_normal((n_seg, dim))
    else:
        means = np.ones((n_seg, dim))
    mean_per_step = np.repeat(means, segment, axis=0)[:length]
    x = mean_per_step + rng.standard_normal((length, dim)) + rng.standard_normal((length, dim))
    return x.astype(np.float32)


# ------------------------------------------------------------------------------------------- digits
def load_digits_split(seed: int = 0, n_test: int = 360) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits as ``(n, 1, 8, 8)`` float32 in [0, 1], split with a fixed permutation."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    y = bunch.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]
