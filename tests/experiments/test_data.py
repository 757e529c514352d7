"""Data loaders on the shared data: shapes, label counts, the bAbI parser, the synthetic series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ftmlopt.experiments import data as D


def test_mnist10k_shapes_and_label_counts(shared_data: Path) -> None:
    images, labels = D.load_mnist10k(shared_data / "mnist10k")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,)
    # the class counts of the official MNIST test split
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert images.max() == 255 and images.min() == 0


def test_mnist_split_is_fixed_disjoint_and_scaled(shared_data: Path) -> None:
    images, labels = D.load_mnist10k(shared_data / "mnist10k")
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


def test_babi_files(shared_data: Path) -> None:
    folder = shared_data / "babi-qa1"
    train, test = D.load_babi(folder)
    assert (len(train), len(test)) == (10000, 1000)
    # answers counted independently of the parser, straight from the question lines
    raw = (folder / D.BABI_TRAIN).read_text(encoding="utf-8").splitlines()
    answers = [line.split("\t")[1] for line in raw if "\t" in line]
    assert [q.answer for q in train] == answers
    vocab, story_len, query_len = D.babi_vocab(train, test)
    assert len(vocab) == 21 and (story_len, query_len) == (68, 4)  # Keras' babi_memnn reports 22 = 21 + padding
    assert {"Mary", "John", "Sandra", "Daniel", "?", "."} <= set(vocab)
    arr = D.vectorize_babi(train[:50], vocab, story_len, query_len)
    assert arr.stories.shape == (50, 68) and arr.questions.shape == (50, 4) and arr.answers.shape == (50,)
    # left padding: the last word of the flattened story sits in the last column
    words = [w for s in train[0].story for w in s]
    n = len(words)
    assert (arr.stories[0, : 68 - n] == 0).all()
    assert [vocab[i - 1] for i in arr.stories[0, 68 - n :]] == words
    assert vocab[arr.answers[0] - 1] == train[0].answer


def test_tinyshakespeare(shared_data: Path) -> None:
    codes, chars = D.load_tinyshakespeare(shared_data / "tinyshakespeare")
    assert len(codes) == 1_115_394 and len(chars) == 65
    assert "".join(chars[i] for i in codes[:9]) == "First Cit"


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


def test_find_shared_data_env_and_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(D.DATA_ENV, str(tmp_path))
    assert D.find_shared_data() == tmp_path
    monkeypatch.setenv(D.DATA_ENV, str(tmp_path / "nope"))
    monkeypatch.setattr(D, "_REPO_ROOT", tmp_path / "a" / "b")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="FTMLOPT_SHARED_DATA"):
        D.find_shared_data()
    assert D.find_shared_data(required=False) is None
    with pytest.raises(FileNotFoundError, match="--data"):
        D.resolve_data_dir(tmp_path / "missing", "mnist10k")


def test_digits_split() -> None:
    xtr, ytr, xte, _ = D.load_digits_split()
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert 0.0 <= xtr.min() and xtr.max() <= 1.0
    assert len(set(ytr.tolist())) == 10
