"""Sharded parameters on a fake 2-device CPU mesh (run in a subprocess: XLA_FLAGS is read once,
when JAX initialises its backend, so it cannot be set from inside this already-running process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from ftmlopt.optax import ftml, ftml_direct

    assert len(jax.devices()) == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    row = NamedSharding(mesh, P("x"))
    col = NamedSharding(mesh, P(None, "x"))
    rng = np.random.default_rng(0)
    host = {"a": rng.standard_normal((8, 4)).astype(np.float32),
            "b": rng.standard_normal((4, 6)).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in host.items()} for _ in range(5)]
    shardings = {"a": row, "b": col}

    for compact in (False, True):
        tx = ftml(learning_rate=0.125, weight_decay=0.01, clip_gradient=1.0, compact=compact)
        update = jax.jit(tx.update)
        p_sh = {k: jax.device_put(v, shardings[k]) for k, v in host.items()}
        p_un = {k: jnp.asarray(v) for k, v in host.items()}
        s_sh, s_un = tx.init(p_sh), tx.init(p_un)
        trees = (s_sh.v,) if compact else (s_sh.d, s_sh.v, s_sh.z)
        for tree in trees:  # init follows the parameters' sharding
            for k in host:
                assert tree[k].sharding.is_equivalent_to(shardings[k], 2), (k, tree[k].sharding)
        for g in grads:
            g_sh = {k: jax.device_put(v, shardings[k]) for k, v in g.items()}
            u_sh, s_sh = update(g_sh, s_sh, p_sh)
            u_un, s_un = update({k: jnp.asarray(v) for k, v in g.items()}, s_un, p_un)
            p_sh, p_un = optax.apply_updates(p_sh, u_sh), optax.apply_updates(p_un, u_un)
            trees = (s_sh.v,) if compact else (s_sh.d, s_sh.v, s_sh.z)
            for tree in (*trees, u_sh, p_sh):
                for k in host:
                    assert tree[k].sharding.is_equivalent_to(shardings[k], 2), (k, tree[k].sharding)
            # Same numbers up to FMA contraction, which XLA may decide differently for the
            # per-device shapes (measured: at most one float32 ulp on a few elements).
            for x, y in zip(jax.tree.leaves((p_sh, s_sh)), jax.tree.leaves((p_un, s_un))):
                x, y = np.asarray(x), np.asarray(y)
                assert np.max(np.abs(x - y)) <= 1e-6 * max(np.max(np.abs(y)), 1e-30), (x, y)
                assert np.mean(x == y) >= 0.5

    # direct form, too, and a step under lax.cond keeps shapes, dtypes and shardings in both branches
    for compact in (True, False):
        opt = ftml_direct(learning_rate=0.125, compact=compact)
        p = {k: jax.device_put(v, shardings[k]) for k, v in host.items()}
        g = {k: jax.device_put(v, shardings[k]) for k, v in grads[0].items()}
        new, state = jax.jit(opt.step)(g, opt.init(p), p)
        for tree in (new, *state[1:]):
            for k in host:
                assert tree[k].sharding.is_equivalent_to(shardings[k], 2), (k, tree[k].sharding)

        @jax.jit
        def maybe(flag, p, s):
            return jax.lax.cond(flag, lambda p, s: opt.step(g, s, p), lambda p, s: (p, s), p, s)

        for flag in (True, False):
            p2, s2 = maybe(flag, p, opt.init(p))
            for tree in (p2, *s2[1:]):
                for k in host:
                    assert tree[k].sharding.is_equivalent_to(shardings[k], 2), (flag, k, tree[k].sharding)
                    assert tree[k].shape == host[k].shape and tree[k].dtype == jnp.float32
    print("SHARDING-OK")
    """
)


def test_sharded_params_give_sharded_states_and_the_same_numbers():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SHARDING-OK" in proc.stdout
