"""Strict JSON for every report ftmlopt writes (``ftmlopt bench``, ``ftmlopt reproduce``, ``ftmlopt demo``).

Python's :mod:`json` writes ``NaN`` and ``Infinity`` by default, which strict JSON parsers (browsers,
``jq``, most other languages) reject. A diverged training run or an empty timing column produces such
values, so every report goes through :func:`strict` first: non-finite floats become ``null``,
tuples become lists, NumPy scalars become Python numbers, and any other object its ``str``.
:func:`write_json` then writes with ``allow_nan=False``, which would raise if one slipped through.

Example:
    >>> import json, math, pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> path = write_json({"loss": [1.5, math.nan], "rows": (1, "x")}, folder / "a" / "r.json")
    >>> json.loads(path.read_text())
    {'loss': [1.5, None], 'rows': [1, 'x']}
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["strict", "write_json"]


def strict(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (and tuples by lists): strict-JSON ready.

    Mappings keep their str/int/float/bool keys (``json`` writes those as strings itself); other keys
    become their ``str``. The argument is not modified.

    Example:
        >>> strict({"a": [1.0, float("nan")], "b": (float("inf"), "x")})
        {'a': [1.0, None], 'b': [None, 'x']}
    """
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k if isinstance(k, str | int | float | bool) else str(k): strict(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [strict(v) for v in x]
    if x is None or isinstance(x, bool | int | str):
        return x
    if isinstance(x, np.generic):
        return strict(x.item())
    return str(x)


def write_json(obj: Any, path: str | os.PathLike[str], *, indent: int = 1) -> Path:
    """Write ``strict(obj)`` to ``path`` (parent folders created), newline-terminated; return the path.

    ``allow_nan=False`` makes a non-finite number that escaped :func:`strict` an error instead of
    non-standard output.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(strict(obj), indent=indent, allow_nan=False) + "\n", encoding="utf-8")
    return out
