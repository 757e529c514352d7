"""Argument checks shared by every front end.

Each check raises ``TypeError`` for a value of the wrong kind and ``ValueError`` for a value
out of range, with a message that names the argument and repeats the value. They never
mutate anything, so callers run them all before touching parameters or state.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = [
    "check_beta",
    "check_bool",
    "check_clip",
    "check_epsilon",
    "check_finite",
    "check_lr",
    "check_nonnegative",
    "check_step",
]


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    return float(value)


def check_finite(value: Any, name: str) -> float:
    """Return ``value`` as a float; it must be a finite real number."""
    x = _real(value, name)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return x


def check_lr(value: Any, name: str = "lr") -> float:
    """A learning rate: finite and strictly positive (FTML divides by it)."""
    x = _real(value, name)
    if not math.isfinite(x) or x <= 0.0:
        raise ValueError(f"Invalid learning rate: {name} must be finite and > 0, got {value!r}")
    return x


def check_beta(value: Any, name: str) -> float:
    """A decay rate in ``[0, 1)``; 1 would divide by ``1 - beta**t = 0``."""
    x = _real(value, name)
    if not 0.0 <= x < 1.0:
        raise ValueError(f"Invalid {name}: must be in [0, 1), got {value!r}")
    return x


def check_epsilon(value: Any, name: str = "epsilon") -> float:
    """Epsilon: finite and non-negative."""
    x = _real(value, name)
    if not math.isfinite(x) or x < 0.0:
        raise ValueError(f"Invalid {name}: must be finite and >= 0, got {value!r}")
    return x


def check_nonnegative(value: Any, name: str) -> float:
    """A finite, non-negative real (``rescale_grad``, ``weight_decay``)."""
    x = _real(value, name)
    if not math.isfinite(x) or x < 0.0:
        raise ValueError(f"Invalid {name}: must be finite and >= 0, got {value!r}")
    return x


def check_clip(value: Any, name: str) -> float:
    """A clipping bound: any real but NaN (negative means "off", as in MXNet's operator)."""
    x = _real(value, name)
    if math.isnan(x):
        raise ValueError(f"Invalid {name}: must not be NaN, got {value!r}")
    return x


def check_step(value: Any, name: str = "t") -> int:
    """An update count: an integer >= 1 (the bias corrections divide by ``1 - beta**t``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"Invalid {name}: the update count must be >= 1, got {value!r}")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """A flag: exactly ``True`` or ``False`` (or a NumPy bool)."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{name} must be a bool, got {value!r} of type {type(value).__name__}")
    return bool(value)
