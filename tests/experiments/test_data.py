"""Data loaders on synthetic files in the real formats: shapes, values, the bAbI parser, the synthetic series.

Expected values come from the generator (``_synthetic.py``) or from counting the raw lines here,
never from the loaders under test.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from _synthetic import BABI_TEST, BABI_TRAIN, PEOPLE, PLACES, VERBS, DataRoot, write_idx_gz

from ftmlopt.datasets import DataUnavailableError, fetch
from ftmlopt.experiments import data as D


def test_load_mnist_full_set(data_written: DataRoot) -> None:
    assert data_written.mnist.train is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the full set gives no warning
        xtr, ytr, xte, yte = D.load_mnist(data_written.root)
    (img_tr, lab_tr), (img_te, lab_te) = data_written.mnist.train, data_written.mnist.test
    assert xtr.shape == (1000, 1, 28, 28) and xte.shape == (10000, 1, 28, 28)
    assert xtr.dtype == np.float32 and ytr.dtype == np.int64
    # the published order is kept, scaled to [0, 1]
    np.testing.assert_array_equal(xtr[:, 0] * 255.0, img_tr.astype(np.float32))
    np.testing.assert_array_equal(xte[:, 0] * 255.0, img_te.astype(np.float32))
    assert ytr.tolist() == lab_tr.tolist() and yte.tolist() == lab_te.tolist()
    assert xtr.min() == 0.0 and xtr.max() == 1.0


def test_load_mnist_test_split_only_says_so(data_written: DataRoot) -> None:
    folder = data_written.root / "mnist10k"
    with pytest.warns(UserWarning, match="only the 10,000-image test split"):
        xtr, ytr, xte, yte = D.load_mnist(folder)
    assert xtr.shape == (8000, 1, 28, 28) and xte.shape == (2000, 1, 28, 28)
    images, labels = data_written.mnist10k.test
    assert np.bincount(np.concatenate([ytr, yte]), minlength=10).tolist() == np.bincount(labels, minlength=10).tolist()
    # it is split_mnist10k's fixed split (seed 0), tested on its own below
    assert np.array_equal(ytr, D.split_mnist10k(images, labels)[1])
    note = fetch("mnist", folder).provenance["note"]
    assert "8,000" in note and "60,000" in note


def test_mnist10k_reader_returns_the_written_arrays(data_written: DataRoot) -> None:
    images, labels = D.load_mnist10k(data_written.root / "mnist10k")
    want_images, want_labels = data_written.mnist10k.test
    assert images.dtype == np.uint8 and labels.dtype == np.uint8
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)


def test_mnist_split_is_fixed_disjoint_and_scaled(data_written: DataRoot) -> None:
    images, labels = data_written.mnist10k.test
    xtr, ytr, xte, yte = D.split_mnist10k(images, labels)
    assert xtr.shape == (8000, 1, 28, 28) and xte.shape == (2000, 1, 28, 28)
    assert xtr.dtype == np.float32 and 0.0 <= xtr.min() and xtr.max() <= 1.0
    # together the two parts are exactly the 10k images (as a multiset of labels and pixel sums)
    assert np.bincount(np.concatenate([ytr, yte]), minlength=10).tolist() == np.bincount(labels).tolist()
    sums = np.sort(np.concatenate([xtr, xte]).reshape(10000, -1).sum(1))
    np.testing.assert_allclose(sums, np.sort(images.reshape(10000, -1).sum(1) / 255.0), rtol=1e-5)
    again = D.split_mnist10k(images, labels)
    assert np.array_equal(again[1], ytr) and np.array_equal(again[3], yte)
    other = D.split_mnist10k(images, labels, seed=1)
    assert not np.array_equal(other[1], ytr)


def test_idx_with_wrong_magic_or_length_is_rejected(tmp_path: Path) -> None:
    write_idx_gz(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros(5, dtype=np.uint8))  # a 1-d file: magic 2049
    write_idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        D.load_mnist10k(tmp_path)
    write_idx_gz(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((4, 28, 28), dtype=np.uint8))
    with pytest.raises(ValueError, match="4 images but 5 labels"):
        D.load_mnist10k(tmp_path)


BABI_SNIPPET = """\
1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Where is Daniel? \thallway\t4
1 Sandra journeyed to the garden.
2 Where is Sandra? \tgarden\t1
"""


def test_babi_parser_on_a_snippet() -> None:
    qs = D.parse_babi(BABI_SNIPPET)
    assert [q.answer for q in qs] == ["bathroom", "hallway", "garden"]
    assert qs[0].question == ("Where", "is", "Mary", "?")
    assert qs[0].story == (
        ("Mary", "moved", "to", "the", "bathroom", "."),
        ("John", "went", "to", "the", "hallway", "."),
    )
    # questions are not story sentences; the story goes on after a question
    assert len(qs[1].story) == 3 and qs[1].story[-1][0] == "Daniel"
    assert qs[1].supporting == (4,)
    # ID 1 starts a new story
    assert qs[2].story == (("Sandra", "journeyed", "to", "the", "garden", "."),)


def test_babi_parser_rejects_malformed_lines() -> None:
    with pytest.raises(ValueError, match="line 1"):
        D.parse_babi("Mary went home.\n")


def _story_lengths(text: str) -> list[int]:
    """Words-and-punctuation count of each question's story, counted from the raw lines."""
    out, count = [], 0
    for line in text.splitlines():
        ident, _, rest = line.partition(" ")
        if ident == "1":
            count = 0
        if "\t" in rest:
            out.append(count)
        else:
            count += len(rest.replace(".", " .").split())
    return out


def test_babi_files(data_written: DataRoot) -> None:
    train, test = D.load_babi(data_written.root)
    raw_train, raw_test = data_written.babi[BABI_TRAIN], data_written.babi[BABI_TEST]
    assert (len(train), len(test)) == (raw_train.count("\t") // 2, raw_test.count("\t") // 2) == (650, 100)
    answers = [line.split("\t")[1] for line in raw_train.splitlines() if "\t" in line]
    assert [q.answer for q in train] == answers
    vocab, story_len, query_len = D.babi_vocab(train, test)
    words = {*PEOPLE, *PLACES, *" ".join(VERBS).split(), "the", "Where", "is", "?", "."}
    assert set(vocab) == words and list(vocab) == sorted(words)
    assert story_len == max(_story_lengths(raw_train) + _story_lengths(raw_test)) and query_len == 4
    arr = D.vectorize_babi(train[:50], vocab, story_len, query_len)
    assert arr.stories.shape == (50, story_len) and arr.questions.shape == (50, 4) and arr.answers.shape == (50,)
    # left padding: the last word of the flattened story sits in the last column
    first = raw_train.splitlines()[:2]
    flat = " ".join(line.partition(" ")[2] for line in first).replace(".", " .").split()
    assert (arr.stories[0, : story_len - len(flat)] == 0).all()
    assert [vocab[i - 1] for i in arr.stories[0, story_len - len(flat) :]] == flat
    assert vocab[arr.answers[0] - 1] == answers[0]


def test_tinyshakespeare(data_written: DataRoot) -> None:
    codes, chars = D.load_tinyshakespeare(data_written.root / "tinyshakespeare")
    assert chars == tuple(sorted(set(data_written.text)))
    assert codes.dtype == np.int64 and len(codes) == len(data_written.text)
    assert "".join(chars[i] for i in codes) == data_written.text


def test_loaders_take_a_fetch_result_and_find_the_env_folder(
    data_written: DataRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = fetch("tinyshakespeare", data_written.root)
    assert D.load_tinyshakespeare(files)[0].tolist() == D.load_tinyshakespeare(files.folder)[0].tolist()
    monkeypatch.setenv("FTMLOPT_DATA", str(data_written.root))
    assert len(D.load_babi()[1]) == 100
    assert D.load_mnist().x_train.shape == (1000, 1, 28, 28)


def test_resolve_data_dir(data_written: DataRoot, tmp_path: Path) -> None:
    root = data_written.root
    assert D.resolve_data_dir(root, "babi-qa1") == root / "babi-qa1"
    files = D.resolve_data(root, "tinyshakespeare")
    assert files.folder == root / "tinyshakespeare" and files.provenance["source"] == "--data"
    assert files.provenance["files"][0]["bytes"] == len(data_written.text.encode())
    assert D.resolve_data_dir(root / "mnist10k", "mnist10k") == root / "mnist10k"
    with pytest.raises(FileNotFoundError, match=re.escape("(--data DIR)")):
        D.resolve_data_dir(tmp_path / "missing", "mnist10k")
    with pytest.raises(DataUnavailableError, match="does not hold"):
        D.resolve_data_dir(tmp_path, "tinyshakespeare")
    with pytest.raises(ValueError, match="unknown data folder 'cifar'"):
        D.resolve_data_dir(root, "cifar")


def test_timeseries_shape_and_shift() -> None:
    x = D.make_timeseries(seed=3, changing=True)
    assert x.shape == (1000, 10) and x.dtype == np.float32
    seg = x.reshape(20, 50, 10).mean(axis=(1, 2))
    # segment i (1-based) has mean i + mean(zeta_i) (sd 0.32) + noise mean (sd 0.06)
    assert np.all(np.abs(seg - np.arange(1, 21)) < 1.6)
    assert np.all(np.diff(seg) > -2.0) and seg[-1] - seg[0] > 15


def test_timeseries_stationary_control() -> None:
    x = D.make_timeseries(seed=3, changing=False)
    assert abs(x.mean() - 1.0) < 0.1
    assert abs(x.var() - 2.0) < 0.2  # N(1, I) plus N(0, I) noise
    assert np.array_equal(x, D.make_timeseries(seed=3, changing=False))
    assert not np.array_equal(x, D.make_timeseries(seed=4, changing=False))


@pytest.mark.frameworks  # scikit-learn
def test_digits_split() -> None:
    xtr, ytr, xte, _ = D.load_digits_split()
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert 0.0 <= xtr.min() and xtr.max() <= 1.0
    assert len(set(ytr.tolist())) == 10
