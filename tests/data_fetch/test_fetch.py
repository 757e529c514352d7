"""ftmlopt.datasets (code in ftmlopt.experiments.datasets): downloads from a local HTTP server, the cache,
``--data``/``$FTMLOPT_DATA``, provenance.

Never the real network: every download here comes from an ``http.server`` on 127.0.0.1 serving bytes made
in the test (some with a wrong checksum, some cut short). Where a test must prove that nothing was
requested, opening a connection fails (``socket.socket.connect``); where it must be offline, resolving a
host name fails (``socket.getaddrinfo``): both hold whatever HTTP library pooch uses. Checksums expected
here are computed with ``hashlib`` from the bytes the test serves.

Downloading needs pooch (the ``demo`` extra): those tests carry the ``frameworks`` marker, so the
NumPy-only run deselects them and runs the rest, which reads folders and the cache without pooch.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import ftmlopt.datasets
import ftmlopt.experiments.datasets as DS
from ftmlopt.datasets import (
    ChecksumMismatchError,
    Dataset,
    DataUnavailableError,
    IncompleteDownloadError,
    RemoteFile,
    describe,
    download,
    fetch,
)

BODY = b"First line of a small text.\nSecond line.\n" * 40
OTHER = b"not the published file\n" * 40


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Server:
    """Files by URL path: ``(bytes, mode)``, mode ``ok`` or ``truncate`` (half the body, then close)."""

    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    base: str = ""


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            if self.path not in state.files:
                self.send_error(404)
                return
            body, mode = state.files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if mode == "ok" else body[: len(body) // 2])
            self.close_connection = True

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty per-user cache and no $FTMLOPT_DATA for every test."""
    monkeypatch.delenv(DS.DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "ftmlopt"


def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no request may be made here")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def offline(monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    """Host names do not resolve, as on a machine without network."""

    def fail(host: Any, *args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_AGAIN, why)

    monkeypatch.setattr(socket, "getaddrinfo", fail)


#: the tests that download need pooch, from the demo extra
needs_pooch = pytest.mark.frameworks


def text_set(server: Server, *bases: str, body: bytes = BODY, name: str = "toy") -> Dataset:
    """A one-file data set downloadable from ``bases`` (paths on the test server)."""
    return Dataset(
        name=name, title="toy text", files=(RemoteFile("input.txt", sha256=sha(body)),),
        urls=tuple(f"{server.base}{b}" for b in bases), canonical="https://example.org/toy", license="none",
        folders=(name,),
    )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------------------- download()
@needs_pooch
def test_download_writes_the_file_and_nothing_else(server: Server, tmp_path: Path) -> None:
    server.files["/a/input.txt"] = (BODY, "ok")
    dest = tmp_path / "dl" / "input.txt"
    assert download(f"{server.base}/a/input.txt", dest, sha256=sha(BODY), progress=False) == dest
    assert dest.read_bytes() == BODY
    assert leftovers(tmp_path / "dl") == ["input.txt"]
    md5 = hashlib.md5(BODY).hexdigest()
    assert download(f"{server.base}/a/input.txt", tmp_path / "m.txt", md5=md5, progress=False).read_bytes() == BODY
    n = len(server.requests)
    assert download(f"{server.base}/a/input.txt", dest, sha256=sha(BODY), progress=False) == dest
    assert len(server.requests) == n  # a file already there with the expected checksum is kept


@needs_pooch
def test_download_checks_both_checksums_when_both_are_given(server: Server, tmp_path: Path) -> None:
    server.files["/input.txt"] = (BODY, "ok")
    dest = tmp_path / "dl" / "input.txt"
    wrong_md5 = hashlib.md5(OTHER).hexdigest()
    with pytest.raises(ChecksumMismatchError, match=f"md5 {hashlib.md5(BODY).hexdigest()}, expected {wrong_md5}"):
        download(f"{server.base}/input.txt", dest, sha256=sha(BODY), md5=wrong_md5, progress=False)
    assert leftovers(tmp_path / "dl") == []


@needs_pooch
@pytest.mark.parametrize("algo", ["sha256", "md5"])
def test_download_with_wrong_checksum_leaves_nothing(server: Server, tmp_path: Path, algo: str) -> None:
    server.files["/input.txt"] = (OTHER, "ok")
    want = sha(BODY) if algo == "sha256" else hashlib.md5(BODY).hexdigest()
    got = getattr(hashlib, algo)(OTHER).hexdigest()
    with pytest.raises(ChecksumMismatchError) as info:
        download(f"{server.base}/input.txt", tmp_path / "dl" / "input.txt", progress=False, **{algo: want})
    msg = str(info.value)
    assert f"{server.base}/input.txt" in msg and want in msg and got in msg and algo.upper() in msg
    assert leftovers(tmp_path / "dl") == []


@needs_pooch
def test_truncated_download_is_an_error_and_leaves_nothing(server: Server, tmp_path: Path) -> None:
    server.files["/input.txt"] = (BODY, "truncate")
    with pytest.raises(IncompleteDownloadError, match="connection closed before the whole file arrived") as info:
        download(f"{server.base}/input.txt", tmp_path / "dl" / "input.txt", sha256=sha(BODY), progress=False)
    assert f"{server.base}/input.txt" in str(info.value)
    assert leftovers(tmp_path / "dl") == []


def test_download_needs_a_checksum(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="checksum is required"):
        download("http://127.0.0.1:9/x", tmp_path / "x")


@pytest.mark.frameworks  # pooch and tqdm, from the demo extras
def test_progress_bar_with_tqdm(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tqdm  # noqa: F401  (installed: the bar is drawn)

    server.files["/input.txt"] = (BODY, "ok")
    download(f"{server.base}/input.txt", tmp_path / "a.txt", sha256=sha(BODY), progress=True)
    captured = capsys.readouterr()
    assert "a.txt" in captured.err and captured.out == ""  # the bar goes to stderr
    assert (tmp_path / "a.txt").read_bytes() == BODY


@needs_pooch
def test_progress_without_tqdm_is_one_line(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server.files["/input.txt"] = (BODY, "ok")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if not installed
    download(f"{server.base}/input.txt", tmp_path / "b.txt", sha256=sha(BODY), progress=True)
    assert capsys.readouterr().err == "downloading b.txt ...\n"
    assert (tmp_path / "b.txt").read_bytes() == BODY


# ----------------------------------------------------------------------------------------------- fetch()
@needs_pooch
def test_fetch_downloads_into_the_cache_then_reads_it_offline(
    server: Server, _isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files["/m1/input.txt"] = (BODY, "ok")
    ds = text_set(server, "/m1/")
    files = fetch(ds, progress=False)
    cache = _isolated / "toy"
    assert files.folder == cache and (cache / "input.txt").read_bytes() == BODY
    prov = files.provenance
    assert prov["source"] == "download" and prov["origin"] == f"{server.base}/m1/"
    assert prov["files"] == [
        {"name": "input.txt", "bytes": len(BODY), "sha256": sha(BODY), "verified": "expected sha256"}
    ]
    assert json.loads(json.dumps(prov, allow_nan=False)) == prov  # strict JSON
    assert leftovers(cache) == ["SOURCE.json", "input.txt"]
    n_requests = len(server.requests)
    no_network(monkeypatch)
    again = fetch(ds, progress=False)
    assert again.provenance["source"] == "cache" and again.provenance["origin"] == f"{server.base}/m1/"
    assert again.provenance["files"] == prov["files"] and len(server.requests) == n_requests
    assert "toy from cache" in describe(again.provenance) and "expected sha256" in describe(again.provenance)


@needs_pooch
def test_fetch_tries_the_next_url_after_a_bad_file(server: Server, _isolated: Path) -> None:
    server.files["/bad/input.txt"] = (OTHER, "ok")
    server.files["/cut/input.txt"] = (BODY, "truncate")
    server.files["/good/input.txt"] = (BODY, "ok")
    files = fetch(text_set(server, "/bad/", "/cut/", "/good/"), progress=False)
    assert files.provenance["origin"] == f"{server.base}/good/"
    assert server.requests == ["/bad/input.txt", "/cut/input.txt", "/good/input.txt"]
    assert (files.folder / "input.txt").read_bytes() == BODY


@needs_pooch
def test_fetch_when_every_download_fails_says_what_to_do(server: Server, _isolated: Path) -> None:
    server.files["/bad/input.txt"] = (OTHER, "ok")
    ds = text_set(server, "/bad/", "/missing/")
    with pytest.raises(DataUnavailableError) as info:
        fetch(ds, progress=False)
    msg = str(info.value)
    cache = _isolated / "toy"
    for part in (f"{server.base}/bad/input.txt", "sha256", f"{server.base}/missing/input.txt", "404",
                 str(cache), "--data DIR", "$FTMLOPT_DATA", "https://example.org/toy"):
        assert part in msg, part
    assert leftovers(cache) == []  # nothing half-written in the cache
    assert isinstance(info.value, FileNotFoundError)


@needs_pooch
def test_fetch_offline_error_names_url_cache_and_option(_isolated: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ds = Dataset(name="toy", title="toy", files=(RemoteFile("input.txt", sha256=sha(BODY)),),
                 urls=(f"http://127.0.0.1:{port}/",), canonical="https://example.org/toy", license="none",
                 folders=("toy",))
    with pytest.raises(DataUnavailableError, match="could not be downloaded") as info:
        fetch(ds, progress=False, timeout=5)
    msg = str(info.value)
    assert f"http://127.0.0.1:{port}/input.txt" in msg and str(_isolated / "toy") in msg and "--data" in msg


def test_fetch_without_download_permission(_isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_network(monkeypatch)
    with pytest.raises(DataUnavailableError, match="downloads disabled"):
        fetch("tinyshakespeare", download=False)


def test_precedence_data_then_env_then_cache(
    tmp_path: Path, _isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_network(monkeypatch)
    ts = DS.DATASETS["tinyshakespeare"]
    given, env_root, cache = tmp_path / "given", tmp_path / "env", _isolated / "tinyshakespeare"
    for folder, text in ((given, "given\n"), (env_root / "tinyshakespeare", "env\n"), (cache, "cache\n")):
        folder.mkdir(parents=True)
        (folder / "input.txt").write_text(text)
    monkeypatch.setenv(DS.DATA_ENV, str(env_root))
    assert fetch(ts, given).provenance["source"] == "--data"
    assert fetch(ts, str(given)).folder == given
    as_root = fetch(ts, env_root)  # --data may also name a folder holding the data set's subfolder
    assert as_root.folder == env_root / "tinyshakespeare" and as_root.provenance["source"] == "--data"
    env = fetch(ts)
    assert env.folder == env_root / "tinyshakespeare" and env.provenance["source"] == "$FTMLOPT_DATA"
    monkeypatch.delenv(DS.DATA_ENV)
    with pytest.raises(DataUnavailableError, match="do not match the expected checksums"):
        fetch(ts)  # a cached file that is not the expected one is not used
    (cache / "input.txt").write_bytes(BODY)
    toy = Dataset(name="tinyshakespeare", title="t", files=(RemoteFile("input.txt", sha256=sha(BODY)),), urls=(),
                  canonical="-", license="-", folders=("tinyshakespeare",))
    hit = fetch(toy)
    assert hit.folder == cache and hit.provenance["source"] == "cache" and hit.provenance["origin"] is None


def test_named_folders_are_used_as_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder the user names is never replaced by the cache or a download, and its files are not required to
    match an expected checksum (a mirror's copy); the provenance says they do not."""
    no_network(monkeypatch)
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_bytes(OTHER)
    files = fetch("tinyshakespeare", tmp_path)  # the root holding the data set's subfolder
    assert files.folder == tmp_path / "tinyshakespeare"
    assert files.provenance["files"][0]["verified"] is None and "unverified" in describe(files.provenance)
    with pytest.raises(DataUnavailableError, match=r"--data folder .* does not hold the data set's files"):
        fetch("babi-qa1", tmp_path)
    monkeypatch.setenv(DS.DATA_ENV, str(tmp_path / "empty"))
    with pytest.raises(DataUnavailableError, match=r"\$FTMLOPT_DATA folder"):
        fetch("mnist")


def test_mnist_test_split_only_folder(tmp_path: Path) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / "mnist10k").mkdir(exist_ok=True)
        (tmp_path / "mnist10k" / name).write_bytes(b"x")
    files = fetch("mnist", tmp_path)
    prov = files.provenance
    assert files.folder == tmp_path / "mnist10k" and not files.has("train-images-idx3-ubyte.gz")
    assert prov["missing"] == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert "only the 10,000-image MNIST test split" in prov["note"] and prov["note"] in describe(prov)


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@needs_pooch
def test_archive_data_set_is_extracted_and_the_archive_removed(server: Server, _isolated: Path) -> None:
    train, test = b"1 Mary went home.\n2 Where is Mary? \thome\t1\n", b"1 John went out.\n"
    archive = _tar_gz({"pack/en-10k/tr.txt": train, "pack/en-10k/te.txt": test, "pack/other.txt": b"-"})
    server.files["/pack.tar.gz"] = (archive, "ok")
    server.files["/corrupt.tar.gz"] = (archive[:-10] + b"0123456789", "ok")
    ds = Dataset(
        name="qa", title="qa", canonical="-", license="-", folders=("qa",),
        files=(RemoteFile("tr.txt", member="pack/en-10k/tr.txt", also_known=((sha(train), "known copy"),)),
               RemoteFile("te.txt", member="pack/en-10k/te.txt")),
        urls=(f"{server.base}/corrupt.tar.gz", f"{server.base}/pack.tar.gz"),
        archive=RemoteFile("pack.tar.gz", sha256=sha(archive)),
    )
    files = fetch(ds, progress=False)
    cache = _isolated / "qa"
    assert (cache / "tr.txt").read_bytes() == train and (cache / "te.txt").read_bytes() == test
    assert leftovers(cache) == ["SOURCE.json", "te.txt", "tr.txt"]
    assert files.provenance["origin"] == f"{server.base}/pack.tar.gz"
    assert [f["verified"] for f in files.provenance["files"]] == ["known copy", None]


def test_cache_root_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert DS.cache_root() == tmp_path / "ftmlopt"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for ignored in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", ignored)
        assert DS.cache_root() == tmp_path / "home" / ".cache" / "ftmlopt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert DS.cache_root() == tmp_path / "home" / ".cache" / "ftmlopt"


def test_registry_has_a_checksum_for_every_download() -> None:
    assert set(DS.DATASETS) == {"mnist", "tinyshakespeare", "babi-qa1"}
    for ds in DS.DATASETS.values():
        assert ds.urls and all(u.startswith(("https://", "http://")) for u in ds.urls)
        checked = [ds.archive] if ds.archive is not None else list(ds.files)
        for f in checked:
            assert f is not None and (f.sha256 or f.md5), (ds.name, f)
            assert len(f.sha256 or "") in (0, 64) and len(f.md5 or "") in (0, 32)
    mnist = {f.name: f for f in DS.DATASETS["mnist"].files}
    assert {n for n, f in mnist.items() if f.optional} == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"}
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        fetch("cifar")


def test_the_documented_path_is_the_same_code() -> None:
    for name in ftmlopt.datasets.__all__:
        assert getattr(ftmlopt.datasets, name) is getattr(DS, name), name


@needs_pooch
def test_offline_is_reported_per_url(monkeypatch: pytest.MonkeyPatch, _isolated: Path) -> None:
    offline(monkeypatch, "Temporary failure in name resolution")
    with pytest.raises(DataUnavailableError) as info:
        fetch("mnist", progress=False)
    msg = str(info.value)
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in msg
    assert "http://yann.lecun.com/exdb/mnist/train-images-idx3-ubyte.gz" in msg
    assert "name resolution" in msg and "--data DIR" in msg and str(_isolated / "mnist") in msg


@pytest.mark.frameworks  # ftmlopt reproduce needs torch, matplotlib, tqdm and pooch
def test_reproduce_offline_names_url_cache_and_data_option(
    monkeypatch: pytest.MonkeyPatch, _isolated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ftmlopt.cli import main

    offline(monkeypatch, "network unreachable")
    assert main(["reproduce", "charlm", "--quick", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt" in err
    assert str(_isolated / "tinyshakespeare") in err and "--data DIR" in err and "network unreachable" in err
    assert not (tmp_path / "out").exists()


def test_without_pooch_a_download_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, _isolated: Path, tmp_path: Path
) -> None:
    """The NumPy-only install reads folders and the cache; a download names the extra, and --data."""
    monkeypatch.setitem(sys.modules, "pooch", None)  # as if not installed
    no_network(monkeypatch)
    with pytest.raises(DataUnavailableError) as info:
        fetch("tinyshakespeare", progress=False)
    msg = str(info.value)
    for part in ("pooch", "pip install 'ftmlopt[demo]'", "--data DIR", "$FTMLOPT_DATA",
                 str(_isolated / "tinyshakespeare"), "https://github.com/karpathy/char-rnn"):
        assert part in msg, part
    with pytest.raises(ImportError, match=r"pip install 'ftmlopt\[demo\]'"):
        download("http://127.0.0.1:9/x", tmp_path / "x", sha256="0" * 64)
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_bytes(BODY)
    assert fetch("tinyshakespeare", tmp_path).provenance["source"] == "--data"  # no pooch needed
