"""Where the experiments' data sets come from: a folder you name, a per-user cache, or a checked download.

Three public data sets are known (:data:`DATASETS`): ``mnist`` (the full MNIST, 60,000 training and
10,000 test images), ``tinyshakespeare`` (karpathy/char-rnn's 1,115,394 characters) and ``babi-qa1``
(bAbI task 1, en-10k). :func:`fetch` finds one, in this order:

1. ``data``, the folder given on the command line (``--data DIR``): the data set's files, or a folder
   holding the data set's subfolder (``mnist/`` or ``mnist10k/``, ``tinyshakespeare/``, ``babi-qa1/``);
2. ``$FTMLOPT_DATA``: a folder holding those subfolders;
3. the per-user cache, ``$XDG_CACHE_HOME/ftmlopt/<name>`` (``~/.cache/ftmlopt/<name>`` when
   ``XDG_CACHE_HOME`` is unset);
4. a download into that cache from the data set's public locations, tried in order, with ``pooch``
   (:func:`pooch.retrieve`; part of the ``demo`` extra, imported only when a download is needed).
   Every file is checked against its expected checksum (sha256, or md5 where that is what is
   published) and its length against ``Content-Length`` before it is moved into place, so the cache
   never holds a partial or wrong file. A progress bar is shown when ``tqdm`` is installed. Without
   pooch the error says ``pip install 'ftmlopt[demo]'`` (or how to pass the files yourself).

When nothing works (offline, say) :class:`DataUnavailableError` (a :class:`FileNotFoundError`) names
every URL tried and why it failed, the cache folder, the ``--data`` option and ``$FTMLOPT_DATA``.

Every :class:`DataFiles` carries a ``provenance`` dict saying which data a run used: the source
(``--data``, ``$FTMLOPT_DATA``, ``cache``, ``download``), the folder, the origin URL, and for each
file its size, sha256 and which expected checksum it matches (``None`` when it matches none, as for
a copy re-compressed by a mirror). Experiments record it in their JSON; :func:`describe` renders it
as one line. Finding, checking and describing files needs only the standard library.

Example (a folder that already holds the files; nothing is downloaded):
    >>> import tempfile, pathlib
    >>> from ftmlopt.experiments.datasets import fetch
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "input.txt").write_text("First Citizen:\\n")
    >>> files = fetch("tinyshakespeare", root)
    >>> files.provenance["source"], files.provenance["files"][0]["bytes"], files.provenance["files"][0]["verified"]
    ('--data', 15, None)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DATASETS",
    "DATA_ENV",
    "INSTALL_HINT",
    "ChecksumMismatchError",
    "DataFiles",
    "DataUnavailableError",
    "Dataset",
    "IncompleteDownloadError",
    "RemoteFile",
    "cache_root",
    "describe",
    "download",
    "fetch",
]

#: environment variable naming a folder that holds one subfolder per data set
DATA_ENV = "FTMLOPT_DATA"

_CHUNK = 1 << 16  # bytes read at a time when hashing


# ------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class RemoteFile:
    """One file of a data set: its name in the data set's folder and the checksums it may match.

    ``sha256``/``md5`` are the expected checksums of the file as downloaded (the check a download
    must pass; at least one is needed to download it). ``also_known`` maps further sha256 values to a
    label (copies from elsewhere, recognised in the provenance but never required). ``member`` is the
    file's path inside the data set's archive when the data set is downloaded as one.
    """

    name: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    also_known: tuple[tuple[str, str], ...] = ()
    member: str | None = None
    optional: bool = False


@dataclass(frozen=True)
class Dataset:
    """A data set: its files, where to download them, and the folder names it goes by.

    ``urls`` are base URLs tried in order (a file's URL is base + name); for an archive data set
    ``archive`` is a :class:`RemoteFile` (name, checksum) fetched from each of ``urls`` (full URLs)
    and the files are read out of it by their ``member`` path. ``optional`` files may be missing from
    a folder the user names (MNIST's training files: the 10k test split alone still works).
    """

    name: str
    title: str
    files: tuple[RemoteFile, ...]
    urls: tuple[str, ...]
    canonical: str
    license: str
    folders: tuple[str, ...] = ()
    archive: RemoteFile | None = None

    @property
    def required(self) -> tuple[RemoteFile, ...]:
        return tuple(f for f in self.files if not f.optional)

    def urls_of(self, f: RemoteFile) -> list[str]:
        """The URLs to try for ``f`` (base URL + file name), or for the archive the URLs themselves."""
        return list(self.urls) if f is self.archive else [u + f.name for u in self.urls]


_KELAS = "sha256 of the kelas/mnist mirror's copy"
_BABI_GH = "sha256 of a GitHub mirror's copy of en-10k"

#: the known data sets, by name
DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            name="mnist",
            title="MNIST (LeCun, Cortes, Burges): 60,000 training and 10,000 test images, 28x28, IDX gzip",
            files=(
                # md5s: the ones torchvision publishes for these files (torchvision.datasets.MNIST.resources)
                RemoteFile("train-images-idx3-ubyte.gz", md5="f68b3c2dcbeaaa9fbdd348bbdeb94873", size=9912422,
                           optional=True),
                RemoteFile("train-labels-idx1-ubyte.gz", md5="d53e105ee54ea40749a09fcbcd1e9432", size=28881,
                           optional=True),
                RemoteFile("t10k-images-idx3-ubyte.gz", md5="9fb629c4189551a2d022fa330f9573f3", size=1648877,
                           also_known=(("167310007f03058885c7e95e6c0b19c20de5c7fd3031f4cbdadc9014a523d80b", _KELAS),)),
                RemoteFile("t10k-labels-idx1-ubyte.gz", md5="ec29112dd5afa0611ce80d1b7f02629c", size=4542,
                           also_known=(("fc607395669ec21321ea83e4b82c0544b7e8e63ff5b34337c06bc0a17cc0da3c", _KELAS),)),
            ),
            # torchvision's mirror first (the original site often refuses scripted downloads), then the original
            urls=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
            canonical="http://yann.lecun.com/exdb/mnist/",
            license="CC BY-SA 3.0",
            folders=("mnist", "mnist10k"),
        ),
        Dataset(
            name="tinyshakespeare",
            title="tiny-shakespeare (karpathy/char-rnn): 1,115,394 characters of Shakespeare's plays",
            files=(
                RemoteFile("input.txt", sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                           size=1115394),
            ),
            urls=("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/",),
            canonical="https://github.com/karpathy/char-rnn/tree/master/data/tinyshakespeare",
            license="public domain text",
            folders=("tinyshakespeare",),
        ),
        Dataset(
            name="babi-qa1",
            title="bAbI task 1 'single supporting fact', en-10k (Weston et al. 2015): 10,000 + 1,000 questions",
            files=(
                RemoteFile("qa1_single-supporting-fact_train.txt",
                           also_known=(("c55ab2224d096363fef2eec026b783f6b08508cc865f1f9b7ed4bae4f6f2b9a0",
                                        _BABI_GH),),
                           member="tasks_1-20_v1-2/en-10k/qa1_single-supporting-fact_train.txt"),
                RemoteFile("qa1_single-supporting-fact_test.txt",
                           also_known=(("809e52cc3c57ac66bf5a7268636a24e15ad1552d9b9bdac0eaca1680da9722e9",
                                        _BABI_GH),),
                           member="tasks_1-20_v1-2/en-10k/qa1_single-supporting-fact_test.txt"),
            ),
            # the archive as Keras' babi examples fetch it, then Facebook's original location
            urls=("https://s3.amazonaws.com/text-datasets/babi_tasks_1-20_v1-2.tar.gz",
                  "http://www.thespermwhale.com/jaseweston/babi/tasks_1-20_v1-2.tar.gz"),
            canonical="https://research.facebook.com/downloads/babi/ (tasks_1-20_v1-2.tar.gz)",
            license="CC BY 3.0",
            folders=("babi-qa1",),
            archive=RemoteFile("tasks_1-20_v1-2.tar.gz",
                               sha256="84f5296ab9a1ad0dc9464e08c491d65cd08830fca3acae9ab86f75e0fb81573c",
                               size=11745123),
        ),
    )
}


# ------------------------------------------------------------------------------------------- errors
class DataUnavailableError(FileNotFoundError):
    """No folder, cache or download gave the data set; the message says what was tried and what to do."""


class ChecksumMismatchError(OSError):
    """A downloaded file's checksum is not the expected one (the file is deleted)."""


class IncompleteDownloadError(OSError):
    """The connection ended before ``Content-Length`` bytes arrived (the partial file is deleted)."""


# --------------------------------------------------------------------------------------- provenance
@dataclass(frozen=True)
class DataFiles:
    """A data set found on disk: its folder, the path of each file present, and the provenance dict."""

    dataset: Dataset
    folder: Path
    paths: dict[str, Path]
    provenance: dict[str, Any] = field(compare=False)

    def has(self, name: str) -> bool:
        return name in self.paths

    def __fspath__(self) -> str:
        return str(self.folder)


def _digests(path: Path) -> tuple[int, str, str]:
    sha, md5, n = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
            n += len(chunk)
    return n, sha.hexdigest(), md5.hexdigest()


def _matches(f: RemoteFile, sha: str, md5: str) -> str | None:
    """Which expected or known checksum ``(sha, md5)`` matches, as a short label; None if none."""
    if f.sha256 is not None and sha == f.sha256:
        return "expected sha256"
    if f.md5 is not None and md5 == f.md5:
        return "expected md5"
    return next((label for known, label in f.also_known if sha == known), None)


def _provenance(ds: Dataset, folder: Path, paths: dict[str, Path], source: str, origin: str | None) -> dict[str, Any]:
    files = []
    by_name = {f.name: f for f in ds.files}
    for name, path in paths.items():
        n, sha, md5 = _digests(path)
        files.append({"name": name, "bytes": n, "sha256": sha, "verified": _matches(by_name[name], sha, md5)})
    prov: dict[str, Any] = {
        "dataset": ds.name,
        "title": ds.title,
        "source": source,
        "folder": str(folder.resolve()),
        "origin": origin,
        "canonical": ds.canonical,
        "license": ds.license,
        "files": files,
    }
    missing = [f.name for f in ds.files if f.name not in paths]
    if missing:
        prov["missing"] = missing
    if ds.name == "mnist" and "train-images-idx3-ubyte.gz" not in paths:
        prov["note"] = (
            "only the 10,000-image MNIST test split is present (no training files): loaders split it "
            "8,000 train / 2,000 held out with a fixed permutation (seed 0); the paper trained on the 60,000 "
            "training images"
        )
    return prov


def describe(provenance: dict[str, Any]) -> str:
    """One line for logs and tables: data set, source, folder, files with size and checksum status.

    Example:
        >>> from ftmlopt.experiments.datasets import describe
        >>> describe({"dataset": "mnist", "source": "cache", "folder": "/c/mnist", "origin": None,
        ...           "files": [{"name": "a.gz", "bytes": 10, "sha256": "ab" * 32, "verified": None}]})
        'mnist from cache /c/mnist: a.gz (10 B, sha256 abababababab, unverified)'
    """
    parts = [
        f"{f['name']} ({f['bytes']} B, sha256 {f['sha256'][:12]}, {f['verified'] or 'unverified'})"
        for f in provenance["files"]
    ]
    origin = f" (downloaded from {provenance['origin']})" if provenance.get("origin") else ""
    note = f" [{provenance['note']}]" if provenance.get("note") else ""
    where = f"{provenance['dataset']} from {provenance['source']} {provenance['folder']}{origin}"
    return f"{where}: {', '.join(parts)}{note}"


# ------------------------------------------------------------------------------------------ locations
def cache_root() -> Path:
    """``$XDG_CACHE_HOME/ftmlopt``, or ``~/.cache/ftmlopt`` when ``XDG_CACHE_HOME`` is unset, empty or
    relative (the XDG base-directory spec says to ignore a relative one)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "ftmlopt"


def _present(ds: Dataset, folder: Path) -> dict[str, Path] | None:
    """The files of ``ds`` in ``folder`` if every required one is there, else None."""
    paths = {f.name: folder / f.name for f in ds.files if (folder / f.name).is_file()}
    return paths if all(f.name in paths for f in ds.required) else None


def _in_named_folder(ds: Dataset, folder: Path) -> tuple[Path, dict[str, Path]] | None:
    """``folder`` itself, or a subfolder named after ``ds``, that holds the data set's files."""
    for cand in (folder, *(folder / sub for sub in ds.folders)):
        paths = _present(ds, cand)
        if paths is not None:
            return cand, paths
    return None


def _lookup(name: str | Dataset) -> Dataset:
    if isinstance(name, Dataset):
        return name
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}") from None


def fetch(
    name: str | Dataset,
    data: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    progress: bool = True,
    timeout: float = 60.0,
) -> DataFiles:
    """Find data set ``name`` (``--data`` folder, ``$FTMLOPT_DATA``, cache, else download); see the module doc.

    A folder given as ``data`` or through ``$FTMLOPT_DATA`` must hold the files: it is never
    replaced by the cache or a download. With ``download=False`` a cache miss raises
    :class:`DataUnavailableError` instead of downloading.
    """
    ds = _lookup(name)
    if data is not None:
        found = _in_named_folder(ds, Path(data))
        if found is None:
            raise DataUnavailableError(_missing_message(ds, Path(data), "--data"))
        return DataFiles(ds, found[0], found[1], _provenance(ds, found[0], found[1], "--data", None))
    env = os.environ.get(DATA_ENV)
    if env:
        found = _in_named_folder(ds, Path(env))
        if found is None:
            raise DataUnavailableError(_missing_message(ds, Path(env), f"${DATA_ENV}"))
        return DataFiles(ds, found[0], found[1], _provenance(ds, found[0], found[1], f"${DATA_ENV}", None))
    folder = cache_root() / ds.name
    origin = _cached_origin(folder)
    if _complete(ds, folder):
        paths = {f.name: folder / f.name for f in ds.files}
        prov = _provenance(ds, folder, paths, "cache", origin)
        bad = [f["name"] for f in prov["files"] if f["verified"] is None and _checkable(ds, f["name"])]
        if bad:
            raise DataUnavailableError(
                f"{ds.name}: cached file(s) {', '.join(bad)} in {folder} do not match the expected checksums; "
                f"delete {folder} to download again, or pass --data DIR / set ${DATA_ENV}"
            )
        return DataFiles(ds, folder, paths, prov)
    if not download:
        raise DataUnavailableError(_offline_message(ds, folder, ["downloads disabled (download=False)"]))
    origin = _download_dataset(ds, folder, progress=progress, timeout=timeout)
    paths = {f.name: folder / f.name for f in ds.files}
    return DataFiles(ds, folder, paths, _provenance(ds, folder, paths, "download", origin))


def _checkable(ds: Dataset, name: str) -> bool:
    f = next(f for f in ds.files if f.name == name)
    return ds.archive is None and (f.sha256 is not None or f.md5 is not None)


def _complete(ds: Dataset, folder: Path) -> bool:
    """The cache is complete when every file (optional ones too) is there."""
    return all((folder / f.name).is_file() for f in ds.files)


def _cached_origin(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / "SOURCE.json").read_text(encoding="utf-8"))["origin"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _missing_message(ds: Dataset, folder: Path, how: str) -> str:
    names = ", ".join(f.name for f in ds.required)
    subs = " or ".join(f"{s}/" for s in ds.folders)
    return (
        f"{ds.name}: {how} folder {str(folder)!r} does not hold the data set's files ({names}), "
        f"neither directly nor in a subfolder {subs}"
    )


def _offline_message(ds: Dataset, folder: Path, failures: list[str]) -> str:
    tried = "; ".join(failures)
    return (
        f"{ds.name}: the data set is not in the cache {folder} and could not be downloaded ({tried}). "
        f"Download it yourself from {ds.canonical} and pass its folder with --data DIR, or set "
        f"${DATA_ENV} to a folder holding {ds.folders[0]}/, or run once where the network is reachable "
        f"(files are cached in {folder})."
    )


# --------------------------------------------------------------------------------------------- download
#: what to install when a download needs pooch
INSTALL_HINT = "pip install 'ftmlopt[demo]'"


def _require_pooch() -> Any:
    """The ``pooch`` module, imported on first download; ImportError naming the extra when it is missing."""
    try:
        import pooch
    except ImportError as exc:
        raise ImportError(f"downloading a data set needs pooch, part of the demo extra: {INSTALL_HINT}") from exc
    return pooch


class _Bar:
    """A tqdm byte bar on stderr named after the file, in the shape pooch drives a custom bar with: it sets
    ``total``, calls ``update``, ``reset`` and ``close``, and tests the bar's truth value (tqdm's own is
    False, or an error, until the total is known, so tqdm is wrapped rather than passed)."""

    def __init__(self, desc: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)

    def __bool__(self) -> bool:
        return True

    @property
    def total(self) -> int | None:
        return self._bar.total  # type: ignore[no-any-return]

    @total.setter
    def total(self, value: int) -> None:
        self._bar.total = value or None  # 0: no Content-Length

    def update(self, n: int) -> None:
        self._bar.update(n)

    def reset(self) -> None:
        self._bar.reset(total=self._bar.total)

    def close(self) -> None:
        self._bar.close()


def _bar(desc: str, progress: bool) -> _Bar | None:
    """The progress bar of one download, or None (no bar; one line on stderr instead when tqdm is missing)."""
    if not progress:
        return None
    try:
        return _Bar(desc)
    except ImportError:
        print(f"downloading {desc} ...", file=sys.stderr)
        return None


@contextlib.contextmanager
def _quiet(pooch: Any) -> Iterator[None]:
    """pooch logs each download at INFO on stderr; the bar (or our one line) says it already. The level of
    pooch's own logger is restored on the way out."""
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel("WARNING")
    try:
        yield
    finally:
        logger.setLevel(level)


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` with :func:`pooch.retrieve`, checking its length and checksum on the way.

    pooch streams the bytes to a temporary file in ``dest``'s folder, checks the sha256 (or md5) and
    only then moves the file to ``dest``; a file already at ``dest`` with that checksum is kept as it
    is. A connection that closes before ``Content-Length`` bytes arrived raises
    :class:`IncompleteDownloadError`, a wrong checksum :class:`ChecksumMismatchError`; in both cases
    nothing is left behind. Other network errors propagate as :class:`OSError` (``requests``'
    exceptions are ``OSError`` subclasses). At least one checksum is required; pooch (the ``demo``
    extra) must be installed.
    """
    if sha256 is None and md5 is None:
        raise ValueError(f"download of {url}: a sha256 or md5 checksum is required")
    pooch = _require_pooch()
    import requests

    dest = Path(dest)
    known = f"sha256:{sha256}" if sha256 is not None else f"md5:{md5}"
    bar = _bar(dest.name, progress)
    downloader = pooch.HTTPDownloader(progressbar=bar or False, timeout=timeout, headers={"User-Agent": "ftmlopt"})
    try:
        with _quiet(pooch):
            pooch.retrieve(url, known_hash=known, fname=dest.name, path=dest.parent, downloader=downloader)
    except ValueError as exc:  # pooch: the checksum does not match (the temporary file is deleted)
        raise ChecksumMismatchError(f"{url}: {exc}") from exc
    except requests.exceptions.ChunkedEncodingError as exc:  # fewer bytes than Content-Length
        raise IncompleteDownloadError(f"{url}: connection closed before the whole file arrived ({exc})") from exc
    finally:
        if bar is not None:
            bar.close()
    if sha256 is not None and md5 is not None:  # pooch checked the sha256; the md5 too
        got = _digests(dest)[2]
        if got != md5:
            dest.unlink()
            raise ChecksumMismatchError(f"{url}: md5 {got}, expected {md5}")
    return dest


def _download_dataset(ds: Dataset, folder: Path, *, progress: bool, timeout: float) -> str:
    """Download every file of ``ds`` into ``folder``, each URL in turn; return the base URL (or archive URL) used."""
    try:
        _require_pooch()
    except ImportError as exc:
        raise DataUnavailableError(_offline_message(ds, folder, [str(exc)])) from None
    failures: list[str] = []
    if ds.archive is not None:
        archive = folder / ds.archive.name
        for url in ds.urls_of(ds.archive):
            try:
                download(url, archive, sha256=ds.archive.sha256, md5=ds.archive.md5, progress=progress,
                         timeout=timeout)
                _extract(ds, archive, folder)
            except (OSError, tarfile.TarError, KeyError) as exc:
                failures.append(f"{url}: {exc}")
                continue
            finally:
                archive.unlink(missing_ok=True)
            _write_source(folder, url)
            return url
        raise DataUnavailableError(_offline_message(ds, folder, failures))
    used = ""
    for f in ds.files:
        if (folder / f.name).is_file():
            continue
        for url in ds.urls_of(f):
            try:
                download(url, folder / f.name, sha256=f.sha256, md5=f.md5, progress=progress, timeout=timeout)
            except OSError as exc:
                failures.append(f"{url}: {exc}")
                continue
            used = url[: -len(f.name)]
            break
        else:
            raise DataUnavailableError(_offline_message(ds, folder, failures))
    _write_source(folder, used or ds.urls[0])
    return used or ds.urls[0]


def _atomic_write(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file in the same folder and :func:`os.replace`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _extract(ds: Dataset, archive: Path, folder: Path) -> None:
    """Copy each file's ``member`` out of the (already verified) archive into ``folder``, each atomically."""
    with tarfile.open(archive, "r:*") as tar:
        for f in ds.files:
            assert f.member is not None
            src = tar.extractfile(f.member)
            if src is None:
                raise KeyError(f"{f.member} is not a regular file in {archive.name}")
            with src:
                _atomic_write(folder / f.name, src.read())


def _write_source(folder: Path, origin: str) -> None:
    stamp = {"origin": origin, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _atomic_write(folder / "SOURCE.json", json.dumps(stamp).encode())
