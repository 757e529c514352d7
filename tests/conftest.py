"""Shared fixtures: MXNet's test vectors and two independent FTML references written here.

Nothing in this file imports the code under test. The references are:

* :func:`reference_step_f64` -- the readable FTML rule in float64 (Python-float hyper-parameters,
  exact decimals unless the caller rounds them first).
* :func:`mxnet_emulation_step` -- MXNet 1.9.1's kernel: hyper-parameters parsed to float32 as
  MXNet parses them, cast to the array dtype, ``beta**t`` from the C library's ``powf``/``pow``
  (loaded here with ctypes), and every operation rounded to that dtype in the kernel's order.
  For float32/float64 it is the bit-exact expectation.

Tests reach them through the session fixture ``ref`` (a namespace), so that hypothesis tests can
use them too.

The MXNet 1.9.1 vectors live in ``tests/data/mxnet_ftml_vectors.json`` (MXNet's outputs, generated
with MXNet 1.9.1; see ``docs/mxnet-parity.md``). A missing file is an error, not a skip.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


DATA = Path(__file__).resolve().parent / "data"


# --------------------------------------------------------------------------- references
def reference_step_f64(w, g, d, v, z, *, lr, t, beta1=0.6, beta2=0.999, epsilon=1e-8, wd=0.0,
                       rescale_grad=1.0, clip=None):
    """One FTML step, float64, plainly as written in the paper/spec. Returns ``(w, d, v, z)`` (new arrays).

    ``clip`` is None (off) or a bound ``c`` (clip to [-c, c]); weight decay is added before clipping.
    """
    w, g, d, v, z = (np.asarray(a, dtype=np.float64) for a in (w, g, d, v, z))
    gp = rescale_grad * g + wd * w
    if clip is not None:
        gp = np.clip(gp, -clip, clip)
    v_new = beta2 * v + (1.0 - beta2) * gp**2
    d_new = (1.0 - beta1**t) / lr * (np.sqrt(v_new / (1.0 - beta2**t)) + epsilon)
    sigma = d_new - beta1 * d
    z_new = beta1 * z + (1.0 - beta1) * gp - sigma * w
    w_new = -z_new / d_new
    return w_new, d_new, v_new, z_new


def theorem1_step_f64(w, gp, v_new, *, lr, t, beta1, beta2, epsilon):
    """The paper's compact form: ``w - lr (1-b1)/(1-b1^t) * g' / (sqrt(v_t/(1-b2^t)) + eps)``."""
    return w - lr * (1.0 - beta1) / (1.0 - beta1**t) * gp / (np.sqrt(v_new / (1.0 - beta2**t)) + epsilon)


_NUMBER = re.compile(r"\s*([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?)(\d+))?")


def mxnet_parse(x: float, double: bool = False):
    """How MXNet 1.9.1 turns a Python hyper-parameter into its C++ field value.

    The value travels as ``str(x)`` and dmlc-core's ``ParseFloat`` reads it (float fields in
    float32, ``epsilon`` in float64): integer part converted, fraction (first 19 digits) divided
    in double and rounded to the field type, the two added in the field type, then divided or
    multiplied by a power of ten that is itself built in the field type (1e8 blocks, then 10s).
    This is not correctly rounded; measured on MXNet 1.9.1 itself, e.g. rescale_grad
    1.9365173080312914 arrives as 1.9365172386169434.
    """
    ft = np.float64 if double else np.float32
    text = str(x)
    if text.lstrip("+-").lower().startswith(("inf", "nan")):
        return ft(float(text))
    sign, ipart, fpart, esign, edigits = _NUMBER.match(text).groups()
    value = ft(int(ipart or "0") % 2**64)
    if fpart:
        kept = fpart[:19]
        value = ft(value + ft(float(int(kept)) / float(10 ** len(kept))))  # both rounded to double first, as in C
    if edigits:
        e = min(int(edigits), 308 if double else 38)
        scale = ft(1)
        with np.errstate(over="ignore"):
            for _ in range(e // 8):
                scale = ft(scale * ft(1e8))
            for _ in range(e % 8):
                scale = ft(scale * ft(10))
            value = ft(value / scale) if esign == "-" else ft(value * scale)
    return ft(-value) if sign == "-" else value


# The C library's powf/pow, loaded here with ctypes (not through ftmlopt): MXNet's kernel takes
# beta**t with them. NumPy's np.power is a different implementation (SIMD paths on some machines)
# and differs from them in the last bit for some (beta, t) pairs, so it cannot stand in for them.
def _load_libm() -> ctypes.CDLL:
    if sys.platform == "win32":
        return ctypes.CDLL("ucrtbase")
    name = ctypes.util.find_library("m")
    return ctypes.CDLL(name) if name else ctypes.CDLL(None)


_LIBM = _load_libm()
_POWF = _LIBM.powf
_POWF.argtypes, _POWF.restype = (ctypes.c_float, ctypes.c_float), ctypes.c_float
_POW = _LIBM.pow
_POW.argtypes, _POW.restype = (ctypes.c_double, ctypes.c_double), ctypes.c_double


def c_power(base, exponent, dt):
    """``base**exponent`` by the C library in dtype ``dt``: ``powf`` for float32, ``pow`` for float64."""
    if dt is np.float32:
        return np.float32(_POWF(float(base), float(exponent)))
    if dt is np.float64:
        return np.float64(_POW(float(base), float(exponent)))
    raise TypeError(f"no C library power for {dt}")


def f32(x: float) -> float:
    """A float field as MXNet receives it (:func:`mxnet_parse`), as a Python float."""
    return float(mxnet_parse(x))


def mxnet_emulation_step(w, g, d, v, z, *, lr, t, beta1=0.6, beta2=0.999, epsilon=1e-8, wd=0.0,
                         rescale_grad=1.0, clip_grad=-1.0):
    """MXNet 1.9.1's ``ftml_update`` kernel, emulated (docs/mxnet-semantics.md). Returns new ``(w, d, v, z)``.

    All arrays must share a dtype ``DT`` (float32 or float64). Float fields are parsed to float32
    and epsilon to float64 as MXNet parses them (:func:`mxnet_parse`); every scalar is then cast to
    ``DT`` and each operation rounds to ``DT``. Written element-wise on whole arrays, one rounding per line.
    """
    dt = np.asarray(w).dtype.type
    w, g, d, v, z = (np.array(a, dtype=dt) for a in (w, g, d, v, z))
    c_lr, c_b1, c_b2 = dt(mxnet_parse(lr)), dt(mxnet_parse(beta1)), dt(mxnet_parse(beta2))
    c_wd, c_rs, c_clip = dt(mxnet_parse(wd)), dt(mxnet_parse(rescale_grad)), dt(mxnet_parse(clip_grad))
    c_eps, c_t, one = dt(mxnet_parse(epsilon, double=True)), dt(t), dt(1)

    gp = (c_rs * g) + (c_wd * w)                      # 1. rescale, add wd (before clipping)
    if c_clip >= 0:                                   # 2. clip; NaN passes through
        gp = np.where(gp > c_clip, c_clip, np.where(gp < -c_clip, -c_clip, gp)).astype(dt)
    sq = gp * gp
    v_new = (c_b2 * v) + ((one - c_b2) * sq)          # 3.
    bias2 = dt(one - c_power(c_b2, c_t, dt))
    dscale = dt(dt(one - c_power(c_b1, c_t, dt)) / c_lr)
    d_t = dscale * (np.sqrt(v_new / bias2) + c_eps)    # 4. eps outside the sqrt
    z_new = ((c_b1 * z) + ((one - c_b1) * gp)) - ((d_t - (c_b1 * d)) * w)   # 5.
    w_new = -z_new / d_t                               # 7.
    out = tuple(np.asarray(a, dtype=dt) for a in (w_new, d_t, v_new, z_new))
    return out


def fp16_expectation(w, g, d, v, z, **hyper):
    """ftmlopt's documented float16 behaviour: upcast to float32, run the kernel once, round once."""
    res32 = mxnet_emulation_step(*(np.asarray(a, dtype=np.float32) for a in (w, g, d, v, z)), **hyper)
    return tuple(a.astype(np.float16) for a in res32)


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, same shape, same bits (so NaNs with equal payload and signed zeros compare)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def arr(values: Any, dtype: Any) -> np.ndarray:
    """A JSON nested list as an array of ``dtype`` (the file's decimals round-trip exactly)."""
    return np.array(values, dtype=dtype)


def max_rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    den = np.maximum(np.abs(b), 1e-300)
    return float(np.max(np.abs(a - b) / den)) if a.size else 0.0


REF = SimpleNamespace(
    step_f64=reference_step_f64,
    theorem1=theorem1_step_f64,
    emulate=mxnet_emulation_step,
    c_power=c_power,
    fp16=fp16_expectation,
    f32=f32,
    parse=mxnet_parse,
    bits_equal=bits_equal,
    max_rel_err=max_rel_err,
    arr=arr,
)


@pytest.fixture(scope="session")
def ref() -> SimpleNamespace:
    """The test-side references (see the module docstring)."""
    return REF


# --------------------------------------------------------------------------- vectors
@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    """``ftml_vectors.json`` as ``{case name: case}``."""
    path = DATA / "mxnet_ftml_vectors.json"
    if not path.is_file():
        pytest.fail(f"MXNet test vectors not found at {path}")
    data = json.loads(path.read_text())
    return {c["name"]: c for c in data["cases"]}


@pytest.fixture(params=["numpy", "default"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the NumPy kernel (``FTMLOPT_DISABLE_CPU_KERNELS=1``) and on the default dispatch."""
    if request.param == "numpy":
        monkeypatch.setenv("FTMLOPT_DISABLE_CPU_KERNELS", "1")
    else:
        monkeypatch.delenv("FTMLOPT_DISABLE_CPU_KERNELS", raising=False)
    return request.param



# --------------------------------------------------------------------------- the `frameworks` marker
# Tests that need an optional extra (torch, JAX/optax/flax, Keras, llvmlite, Triton, scikit-learn, matplotlib,
# Lightning) carry the `frameworks` marker: every test in the folders and files below gets it here, other
# tests declare it themselves. The NumPy-only run (`make test-bare`: `pytest -m "not frameworks"`) does
# not even import those files, so a module-level `import torch` cannot break its collection. Deselected
# is not skipped: in any run a skipped test fails the session (`--allow-skips` permits skips), so the full
# run (`make test`) provably runs every test.
_FRAMEWORK_DIRS = frozenset({"bench", "distributed", "jax", "keras", "kernels", "resume", "soak", "torch"})
_FRAMEWORK_FILES = frozenset({
    "fuzz/test_fuzz_keras.py", "fuzz/test_fuzz_optax.py", "fuzz/test_fuzz_torch.py", "lowbit/test_backends.py",
})
_TESTS = Path(__file__).resolve().parent


def _needs_frameworks(path: Path) -> bool:
    """Whether every test under ``path`` needs an optional extra (see the block comment above)."""
    try:
        parts = Path(path).resolve().relative_to(_TESTS).parts
    except ValueError:
        return False
    if not parts:
        return False
    if parts[0] in _FRAMEWORK_DIRS:
        return True
    if parts[0] == "experiments":  # torch experiments, except the NumPy data loaders
        return len(parts) > 1 and parts[1].startswith("test_") and parts[1] != "test_data.py"
    return "/".join(parts) in _FRAMEWORK_FILES


def _frameworks_deselected(config: pytest.Config) -> bool:
    return bool(re.search(r"\bnot\s+frameworks\b", config.getoption("markexpr", "") or ""))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--allow-skips", action="store_true", default=False,
        help="do not fail the session when a test is skipped (by default a skip fails it: CI runs every test)",
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if _frameworks_deselected(config) and _needs_frameworks(collection_path):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _needs_frameworks(item.path):
            item.add_marker(pytest.mark.frameworks)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.getoption("--allow-skips"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and session.exitstatus == pytest.ExitCode.OK:
        reporter.ensure_newline()
        reporter.write_line(f"{len(skipped)} test(s) skipped: every test must run (pass --allow-skips to permit it)",
                            red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
