"""MXNet's own ``ftml_update`` timed in another interpreter, one step per request (``ftmlopt bench --mxnet``).

MXNet 1.9.1 needs an old NumPy, so it lives in its own virtual environment; the benchmark starts
``PYTHON -m ftmlopt.bench.mxnet_server`` there (with this checkout's ``src`` on ``PYTHONPATH``) and
drives it round by round, so its times interleave with the in-process ones. The protocol is JSON
lines on stdin/stdout, parsed with :func:`json.loads` and validated field by field (nothing sent is
ever evaluated):

* the server first answers ``{"ready": true, "mxnet": VERSION}``, or ``{"error": MESSAGE}`` and
  exits 1 when ``import mxnet`` fails;
* ``{"op": "setup", "shapes": [[N, ...], ...], "dtype": "float32", "lr": .., "beta1": .., "beta2": ..,
  "eps": ..}`` builds random weights and gradients and zero state, answered ``{"ok": true}``;
* ``{"op": "step"}`` runs ``mx.nd.ftml_update`` on every tensor, waits for MXNet's engine, and
  answers ``{"seconds": ELAPSED}``;
* ``{"op": "close"}`` or end of input stops the server. A malformed request is answered
  ``{"error": MESSAGE}`` and stops it (exit status 1).

Example:
    >>> parse_request('{"op": "setup", "shapes": [[3, 2]], "dtype": "float32", "lr": 0.001, '
    ...               '"beta1": 0.6, "beta2": 0.999, "eps": 1e-8}')["shapes"]
    [(3, 2)]
    >>> parse_request("__import__('os')")
    Traceback (most recent call last):
    ...
    ValueError: request is not JSON: "__import__('os')"
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import IO, Any

__all__ = ["DTYPES", "MXNetProcess", "parse_request", "serve"]

#: the dtypes the server accepts
DTYPES = ("float32", "float64", "float16")
_HYPER_KEYS = ("lr", "beta1", "beta2", "eps")


def parse_request(line: str) -> dict[str, Any]:
    """One request line -> ``{"op": ...}`` (setup: with ``shapes`` as tuples, ``dtype`` and the floats).

    Raises ValueError naming what is wrong: not JSON, not an object, an unknown ``op``, a shape that is
    not a list of positive integers, an unknown dtype, a hyper-parameter that is not a finite number.
    """
    try:
        req = json.loads(line)
    except ValueError:
        raise ValueError(f"request is not JSON: {line.strip()!r}") from None
    if not isinstance(req, dict):
        raise ValueError(f"request is not a JSON object: {line.strip()!r}")
    op = req.get("op")
    if op in ("step", "close"):
        return {"op": op}
    if op != "setup":
        raise ValueError(f"unknown op {op!r} (use setup, step or close)")
    shapes = req.get("shapes")
    if not isinstance(shapes, list) or not all(
        isinstance(s, list) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in s)
        for s in shapes
    ):
        raise ValueError(f"setup: shapes must be a list of lists of positive integers, got {shapes!r}")
    if req.get("dtype") not in DTYPES:
        raise ValueError(f"setup: dtype must be one of {', '.join(DTYPES)}, got {req.get('dtype')!r}")
    out: dict[str, Any] = {"op": "setup", "shapes": [tuple(s) for s in shapes], "dtype": req["dtype"]}
    for key in _HYPER_KEYS:
        value = req.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"setup: {key} must be a finite number, got {value!r}")
        out[key] = float(value)
    return out


def _reply(out: IO[str], obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def serve(mx: Any, lines: Iterable[str], out: IO[str]) -> int:
    """Answer the requests in ``lines`` with the MXNet module ``mx``; return the exit status."""
    import numpy as np

    _reply(out, {"ready": True, "mxnet": str(mx.__version__)})
    setup: dict[str, Any] | None = None
    ws: list[Any] = []
    gs: list[Any] = []
    states: list[list[Any]] = []
    t = 0
    for line in lines:
        try:
            req = parse_request(line)
            if req["op"] == "step" and setup is None:
                raise ValueError("step before setup")
        except ValueError as exc:
            _reply(out, {"error": str(exc)})
            return 1
        if req["op"] == "close":
            break
        if req["op"] == "setup":
            setup, dtype, t = req, req["dtype"], 0
            rng = np.random.default_rng(0)
            ws = [mx.nd.array(rng.standard_normal(s), dtype=dtype) for s in req["shapes"]]
            gs = [mx.nd.array(rng.standard_normal(s), dtype=dtype) for s in req["shapes"]]
            states = [[mx.nd.zeros(s, dtype=dtype) for _ in range(3)] for s in req["shapes"]]
            _reply(out, {"ok": True})
            continue
        assert setup is not None
        t += 1
        start = time.perf_counter()
        for w, g, (d, v, z) in zip(ws, gs, states):
            mx.nd.ftml_update(w, g, d, v, z, lr=setup["lr"], beta1=setup["beta1"], beta2=setup["beta2"],
                              epsilon=setup["eps"], t=t, out=w)
        mx.nd.waitall()
        _reply(out, {"seconds": time.perf_counter() - start})
    return 0


def main() -> int:
    """``python -m ftmlopt.bench.mxnet_server``: serve stdin/stdout (see the module docstring)."""
    try:
        import mxnet as mx
    except Exception as exc:  # ImportError, or an mxnet that fails on this NumPy
        _reply(sys.stdout, {"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return serve(mx, sys.stdin, sys.stdout)


class MXNetProcess:
    """The client: MXNet's operator in the interpreter ``python``, stepped on request (rounds stay interleaved)."""

    def __init__(self, python: str, shapes: list[tuple[int, ...]], dtype: str, threads: int) -> None:
        from ftmlopt.bench.workloads import HYPER

        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p),
            # Idle OpenMP threads must sleep, not spin: this process waits while the others are timed.
            "OMP_NUM_THREADS": str(threads or os.cpu_count() or 1),
            "OMP_WAIT_POLICY": "PASSIVE",
        }
        self.proc = subprocess.Popen([python, "-m", "ftmlopt.bench.mxnet_server"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        ready = self._read()
        if not ready.get("ready"):
            self.close()
            why = f": {ready['error']}" if "error" in ready else ""
            raise RuntimeError(f"MXNet is not importable in {python}{why}")
        self.version = str(ready["mxnet"])
        setup = {"op": "setup", "shapes": [list(s) for s in shapes], "dtype": dtype,
                 **{k: HYPER[k] for k in _HYPER_KEYS}}
        if not self._ask(setup).get("ok"):
            self.close()
            raise RuntimeError(f"the MXNet server in {python} refused the setup")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        try:
            reply = json.loads(line)
        except ValueError:
            return {"error": f"no reply from ftmlopt.bench.mxnet_server (got {line.strip()!r}; see its stderr)"}
        return reply if isinstance(reply, dict) else {"error": f"unexpected reply {line.strip()!r}"}

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"MXNet server: {reply['error']}")
        return reply

    def step(self) -> float:
        """One ``ftml_update`` over every tensor in the server; its seconds, as the server timed them."""
        return float(self._ask({"op": "step"})["seconds"])

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.write(json.dumps({"op": "close"}) + "\n")
                self.proc.stdin.close()
            except BrokenPipeError:  # the server has already exited
                pass
        self.proc.wait(timeout=60)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
