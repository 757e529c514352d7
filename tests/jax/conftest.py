"""JAX 0.4.30, the floor that `make test-oldest` runs, has the float64 context manager only as
``jax.experimental.enable_x64``; current JAX has it as ``jax.enable_x64`` (what these tests call). On the
old JAX the test session gets the public name, pointing at the same function; nothing else changes."""

from __future__ import annotations

import jax

if not hasattr(jax, "enable_x64"):
    from jax.experimental import enable_x64

    jax.enable_x64 = enable_x64
