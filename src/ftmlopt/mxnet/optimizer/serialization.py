"""The pickle-free state format of :meth:`Updater.get_states` / :meth:`Updater.set_states`.

A blob is an ``.npz`` archive (read back with ``allow_pickle=False``) holding:

* ``header``: UTF-8 JSON as a ``uint8`` array, with ``format`` = ``"ftmlopt.updater-states"``,
  ``version`` = 1, the states' structure (nested tuples/lists/None whose leaves name arrays),
  the per-device update counts and ``num_update``, and optionally the optimizer;
* ``a0``, ``a1``, ...: the state arrays.

Everything in the header is tagged data (no code): keys keep their type (int or str), tuples
stay tuples, non-finite floats survive. An optimizer is stored as its registered name plus its
attributes (minus ``param_dict``), and a built-in scheduler as its class name plus its
attributes; anything else (a lambda scheduler, an arbitrary object) raises ``TypeError`` at
save time rather than being silently dropped.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from typing import Any

import numpy as np

FORMAT = "ftmlopt.updater-states"
VERSION = 1

__all__ = ["FORMAT", "VERSION", "decode_value", "dumps", "encode_value", "loads"]


class StateFormatError(ValueError):
    """A blob that is not a valid ftmlopt state archive (truncated, foreign, or malformed)."""


# --------------------------------------------------------------------------- tagged values
def encode_value(value: Any, where: str) -> Any:
    """Encode plain data (and built-in schedulers) as JSON-safe tagged values."""
    from ftmlopt.mxnet import lr_scheduler as sched_mod

    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [encode_value(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return {"list": [encode_value(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        return {"dict": [[encode_value(k, where), encode_value(v, f"{where}[{k!r}]")] for k, v in value.items()]}
    if isinstance(value, sched_mod.LRScheduler):
        cls = type(value)
        if getattr(sched_mod, cls.__name__, None) is not cls:
            raise TypeError(
                f"cannot store {where}: scheduler class {cls.__module__}.{cls.__qualname__} is not one of "
                "ftmlopt.mxnet.lr_scheduler's built-in schedulers"
            )
        return {"scheduler": cls.__name__, "attrs": encode_value(dict(vars(value)), where)}
    raise TypeError(
        f"cannot store {where} as data: {type(value).__qualname__} objects are not serialisable "
        "(use a built-in scheduler, or save without dump_optimizer)"
    )


def decode_value(value: Any) -> Any:
    """Inverse of :func:`encode_value`; raises :class:`StateFormatError` on unknown tags."""
    from ftmlopt.mxnet import lr_scheduler as sched_mod

    if value is None or isinstance(value, bool | str | int | float):
        return value
    if isinstance(value, dict) and len(value) in (1, 2):
        if set(value) == {"float"}:
            return float(value["float"])
        if set(value) == {"tuple"}:
            return tuple(decode_value(v) for v in value["tuple"])
        if set(value) == {"list"}:
            return [decode_value(v) for v in value["list"]]
        if set(value) == {"dict"}:
            return {decode_value(k): decode_value(v) for k, v in value["dict"]}
        if set(value) == {"scheduler", "attrs"}:
            cls = getattr(sched_mod, str(value["scheduler"]), None)
            if not (isinstance(cls, type) and issubclass(cls, sched_mod.LRScheduler)):
                raise StateFormatError(f"unknown scheduler class {value['scheduler']!r}")
            obj = cls.__new__(cls)
            attrs = decode_value(value["attrs"])
            if not isinstance(attrs, dict):
                raise StateFormatError("scheduler attributes must be a dict")
            obj.__dict__.update(attrs)
            return obj
    raise StateFormatError(f"unrecognised tagged value {str(value)[:80]!r}")


# --------------------------------------------------------------------------- archive
def _encode_structure(state: Any, arrays: list[np.ndarray], where: str) -> Any:
    if state is None:
        return None
    if isinstance(state, np.ndarray):
        if state.dtype.kind != "f":
            raise TypeError(f"{where} is a {state.dtype} array; only floating-point states can be stored")
        arrays.append(state)
        return {"array": len(arrays) - 1}
    if isinstance(state, tuple | list):
        tag = "tuple" if isinstance(state, tuple) else "list"
        return {tag: [_encode_structure(s, arrays, f"{where}[{i}]") for i, s in enumerate(state)]}
    raise TypeError(f"{where} has type {type(state).__name__}; states must be arrays, tuples, lists or None")


def _decode_structure(node: Any, arrays: dict[str, np.ndarray]) -> Any:
    if node is None:
        return None
    if isinstance(node, dict) and len(node) == 1:
        ((tag, val),) = node.items()
        if tag == "array":
            key = f"a{int(val)}"
            if key not in arrays:
                raise StateFormatError(f"state refers to missing array {key}")
            arr = arrays[key]
            if arr.dtype.kind != "f":
                raise StateFormatError(f"array {key} has non-float dtype {arr.dtype}")
            return arr
        if tag in ("tuple", "list") and isinstance(val, list):
            items = [_decode_structure(v, arrays) for v in val]
            return tuple(items) if tag == "tuple" else items
    raise StateFormatError(f"malformed state structure {str(node)[:80]!r}")


def dumps(states: dict[Any, Any], counts: dict[str, Any], optimizer: Any | None) -> bytes:
    """Serialise updater states (+ counts, + optionally an encoded optimizer) to bytes."""
    arrays: list[np.ndarray] = []
    entries = []
    for key, state in states.items():
        if isinstance(key, bool) or not isinstance(key, int | str):
            raise TypeError(f"state key {key!r} must be an int or a str")
        entries.append([key, _encode_structure(state, arrays, f"state {key!r}")])
    header = {
        "format": FORMAT,
        "version": VERSION,
        "states": [[encode_value(k, "key"), s] for k, s in entries],
        "counts": encode_value(counts, "counts"),
        "optimizer": optimizer,
    }
    buf = io.BytesIO()
    # Any, not ndarray: np.savez's stubs would otherwise match the dict against allow_pickle (a bool)
    payload: dict[str, Any] = {f"a{i}": a for i, a in enumerate(arrays)}
    payload["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    np.savez(buf, **payload)
    return buf.getvalue()


def loads(blob: Any) -> tuple[dict[Any, Any], dict[str, Any], Any]:
    """Parse a blob from :func:`dumps`: ``(states, counts, encoded optimizer or None)``.

    Raises:
        TypeError: ``blob`` is not bytes.
        StateFormatError: (a ``ValueError``) truncated, foreign or malformed data.
    """
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise TypeError(f"states must be bytes from Updater.get_states(), got {type(blob).__name__}")
    try:
        with np.load(io.BytesIO(bytes(blob)), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise StateFormatError(
            f"states are not an ftmlopt state archive (truncated, corrupted or from another tool, e.g. an "
            f"MXNet pickle): {exc}"
        ) from exc
    raw = arrays.pop("header", None)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise StateFormatError("states archive has no valid header")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFormatError(f"states header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StateFormatError(
            f"states header has format {header.get('format') if isinstance(header, dict) else None!r}, "
            f"expected {FORMAT!r}"
        )
    if header.get("version") != VERSION:
        raise StateFormatError(f"unsupported states format version {header.get('version')!r} (this is {VERSION})")
    try:
        states = {decode_value(k): _decode_structure(s, arrays) for k, s in header["states"]}
        counts = decode_value(header["counts"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFormatError(f"malformed states header: {exc}") from exc
    if not isinstance(counts, dict):
        raise StateFormatError("counts must be a dict")
    return states, counts, header.get("optimizer")
