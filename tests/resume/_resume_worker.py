"""Exact-resume worker: ``python _resume_worker.py {save,resume} FRONTEND DIR``.

``save`` runs every config of FRONTEND for ``TOTAL`` steps without stopping, writes the final
weights and state to ``DIR/uninterrupted-CONFIG.npz``, and on the way writes a checkpoint after
``k`` steps for each ``k`` in ``KS`` (each front end's own format: ``Updater.get_states`` bytes,
``torch.save`` of ``state_dict()``, the optax state's leaves, the Keras optimizer's variables).
``resume`` (a new process) builds each optimizer from scratch, loads the checkpoint, runs the
remaining steps and writes ``DIR/resumed-CONFIG-kK.npz``; it also writes ``fresh-CONFIG-kK.npz``,
the same continuation from the saved weights with a *new* optimizer state, which must differ
(proof that the checkpoint is what makes the resumed run exact).

Gradients are a fixed function of the step and the current weights (``grad``), computed the same
way in both processes. Every array is written as float64 (exact for float16/bfloat16/float32).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TOTAL = 5
KS = (1, 3)
SHAPES = {"w": (3, 4), "b": (5,)}


def target_noise(name: str, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The (target, noise) pair for parameter ``name`` at 0-based ``step``, float64."""
    seed = 1000 * step + sum(map(ord, name))
    rng = np.random.default_rng(seed)
    shape = SHAPES.get(name, (4,))
    return rng.normal(size=shape), rng.normal(scale=0.5, size=shape)


def grad(name: str, step: int, w: Any, asarray: Callable[[np.ndarray], Any]) -> Any:
    """``2 (w - target) + noise``: a noisy quadratic's gradient, in ``w``'s own array type."""
    target, noise = target_noise(name, step)
    return (w - asarray(target)) * 2 + asarray(noise)


def initial(name: str) -> np.ndarray:
    return np.random.default_rng(7 + sum(map(ord, name))).normal(size=SHAPES.get(name, (4,)))


def save_npz(path: Path, arrays: dict[str, Any]) -> None:
    np.savez(path, **{k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()})


# --------------------------------------------------------------------------- numpy Updater
def _numpy_configs() -> dict[str, tuple[Callable[[], Any], dict[str, Any], bool]]:
    """name -> (optimizer factory, {key: dtype}, dump_optimizer)."""
    from ftmlopt import lr_scheduler
    from ftmlopt.mxnet.optimizer import FTML

    return {
        "plain": (lambda: FTML(learning_rate=0.05), {"w": np.float32, "b": np.float64}, False),
        "full": (
            lambda: FTML(
                learning_rate=0.05, wd=1e-3, clip_gradient=0.5, rescale_grad=0.5, multi_precision=True,
                lr_scheduler=lr_scheduler.FactorScheduler(step=2, factor=0.5),
            ),
            {"w": np.float32, "b": np.float64, "h": np.float16},
            True,
        ),
    }


def _numpy_step(updater: Any, weights: dict[str, np.ndarray], step: int) -> None:
    for name, w in weights.items():
        g = grad(name, step, w.astype(np.float64), np.asarray).astype(w.dtype)
        updater(name, g, w)


def _flatten(state: Any) -> list[np.ndarray]:
    if isinstance(state, tuple | list):
        return [a for s in state for a in _flatten(s)]
    return [state]


def _numpy_dump(updater: Any, weights: dict[str, np.ndarray]) -> dict[str, Any]:
    out = {f"weight/{k}": w for k, w in weights.items()}
    for key, state in updater.states.items():
        for i, a in enumerate(_flatten(state)):
            out[f"state/{key}/{i}"] = a
    out["counts"] = np.array(sorted(updater.optimizer._index_update_count.items()), dtype=object)[:, 1].astype(float)
    return out


def numpy_save(root: Path) -> None:
    from ftmlopt.mxnet.optimizer import get_updater

    for cfg, (factory, dtypes, dump) in _numpy_configs().items():
        updater = get_updater(factory())
        weights = {k: initial(k).astype(dt) for k, dt in dtypes.items()}
        for step in range(TOTAL):
            if step in KS:
                (root / f"ckpt-{cfg}-k{step}.states").write_bytes(updater.get_states(dump_optimizer=dump))
                save_npz(root / f"ckpt-{cfg}-k{step}-weights.npz", weights)
            _numpy_step(updater, weights, step)
        save_npz(root / f"uninterrupted-{cfg}.npz", _numpy_dump(updater, weights))


def numpy_resume(root: Path) -> None:
    from ftmlopt.mxnet.optimizer import get_updater

    for cfg, (factory, dtypes, _) in _numpy_configs().items():
        for k in KS:
            for fresh in (False, True):
                updater = get_updater(factory())
                if not fresh:
                    updater.set_states((root / f"ckpt-{cfg}-k{k}.states").read_bytes())
                with np.load(root / f"ckpt-{cfg}-k{k}-weights.npz") as z:
                    weights = {key: z[key].astype(dt) for key, dt in dtypes.items()}
                for step in range(k, TOTAL):
                    _numpy_step(updater, weights, step)
                save_npz(root / f"{'fresh' if fresh else 'resumed'}-{cfg}-k{k}.npz", _numpy_dump(updater, weights))


# --------------------------------------------------------------------------- torch
_TORCH_CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},  # the default implementation (fused on the CPU when llvmlite is there)
    "loop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
    "fused_clip_wd_max": {"fused": True, "clip_gradient": 0.3, "weight_decay": 1e-2, "maximize": True},
    "mxnet_decoupled": {"foreach": False, "compact": False, "weight_decay": 0.1, "decoupled_weight_decay": True},
    "mxnet_fused": {"fused": True, "compact": False},
    "bf16_master": {"multi_precision": True},
}


def _torch_setup(cfg: str) -> tuple[Any, Any, Any]:
    import torch

    from ftmlopt.torch import FTML

    dtype = torch.bfloat16 if cfg == "bf16_master" else torch.float32
    params = {k: torch.nn.Parameter(torch.tensor(initial(k), dtype=dtype)) for k in SHAPES}
    opt = FTML(list(params.values()), lr=0.05, **_TORCH_CONFIGS[cfg])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return params, opt, sched


def _torch_step(params: dict[str, Any], opt: Any, sched: Any, step: int) -> None:
    import torch

    for name, p in params.items():
        p.grad = grad(name, step, p.detach().double(), torch.from_numpy).to(p.dtype)
    opt.step()
    sched.step()


def _torch_dump(params: dict[str, Any], opt: Any) -> dict[str, Any]:
    out = {f"weight/{k}": p.detach().double().numpy() for k, p in params.items()}
    for i, p in enumerate(params.values()):
        for key, t in sorted(opt.state[p].items()):
            out[f"state/{i}/{key}"] = t.detach().double().numpy()
    return out


def torch_save(root: Path) -> None:
    import torch

    torch.set_num_threads(1)
    for cfg in _TORCH_CONFIGS:
        params, opt, sched = _torch_setup(cfg)
        for step in range(TOTAL):
            if step in KS:
                torch.save(
                    {"params": {k: p.detach() for k, p in params.items()}, "optim": opt.state_dict(),
                     "sched": sched.state_dict()},
                    root / f"ckpt-{cfg}-k{step}.pt",
                )
            _torch_step(params, opt, sched, step)
        save_npz(root / f"uninterrupted-{cfg}.npz", _torch_dump(params, opt))


def torch_resume(root: Path) -> None:
    import torch

    torch.set_num_threads(1)
    for cfg in _TORCH_CONFIGS:
        for k in KS:
            for fresh in (False, True):
                params, opt, sched = _torch_setup(cfg)
                ckpt = torch.load(root / f"ckpt-{cfg}-k{k}.pt", weights_only=True)
                with torch.no_grad():
                    for name, p in params.items():
                        p.copy_(ckpt["params"][name])
                if not fresh:
                    opt.load_state_dict(ckpt["optim"])
                    sched.load_state_dict(ckpt["sched"])
                for step in range(k, TOTAL):
                    _torch_step(params, opt, sched, step)
                save_npz(root / f"{'fresh' if fresh else 'resumed'}-{cfg}-k{k}.npz", _torch_dump(params, opt))


# --------------------------------------------------------------------------- optax
def _optax_configs() -> dict[str, Any]:
    import optax

    from ftmlopt.optax import ftml, ftml_direct

    return {
        "ftml": ftml(learning_rate=0.05, weight_decay=1e-3, clip_gradient=0.5),
        "compact": ftml(learning_rate=0.05, compact=True),
        "schedule": ftml(learning_rate=optax.exponential_decay(0.05, 2, 0.5)),
        "chain": optax.chain(optax.clip_by_global_norm(3.0), ftml(learning_rate=0.05)),
        "direct": ftml_direct(learning_rate=0.05),
    }


def _optax_params() -> dict[str, Any]:
    import jax.numpy as jnp

    return {"w": jnp.asarray(initial("w"), jnp.float32), "b": jnp.asarray(initial("b"), jnp.bfloat16)}


def _optax_runner(cfg: str, tx: Any) -> Callable[[Any, Any, int], tuple[Any, Any]]:
    import jax
    import jax.numpy as jnp
    import optax

    def grads_of(params: Any, step: int) -> Any:
        return {k: grad(k, step, p.astype(jnp.float32), jnp.asarray).astype(p.dtype) for k, p in params.items()}

    if cfg == "direct":
        step_fn = jax.jit(tx.step)

        def run(params: Any, state: Any, step: int) -> tuple[Any, Any]:
            return step_fn(grads_of(params, step), state, params)

        return run

    update = jax.jit(tx.update)

    def run(params: Any, state: Any, step: int) -> tuple[Any, Any]:
        updates, state = update(grads_of(params, step), state, params)
        return optax.apply_updates(params, updates), state

    return run


def _optax_dump(params: Any, state: Any) -> dict[str, Any]:
    import jax

    out = {f"weight/{k}": np.asarray(p, dtype=np.float64) for k, p in params.items()}
    for i, leaf in enumerate(jax.tree.leaves(state)):
        out[f"state/{i}"] = np.asarray(leaf, dtype=np.float64)
    return out


def optax_save(root: Path) -> None:
    import jax

    for cfg, tx in _optax_configs().items():
        params = _optax_params()
        state = tx.init(params)
        run = _optax_runner(cfg, tx)
        for step in range(TOTAL):
            if step in KS:  # the user's checkpoint: the state's leaves and the params, as NumPy arrays
                leaves = {f"s{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
                leaves.update({f"p/{k}": np.asarray(p, dtype=np.float32) for k, p in params.items()})
                np.savez(root / f"ckpt-{cfg}-k{step}.npz", **leaves)
            params, state = run(params, state, step)
        save_npz(root / f"uninterrupted-{cfg}.npz", _optax_dump(params, state))


def optax_resume(root: Path) -> None:
    import jax
    import jax.numpy as jnp

    for cfg, tx in _optax_configs().items():
        run = _optax_runner(cfg, tx)
        for k in KS:
            for fresh in (False, True):
                template = _optax_params()
                state = tx.init(template)
                with np.load(root / f"ckpt-{cfg}-k{k}.npz") as z:
                    params = {name: jnp.asarray(z[f"p/{name}"], p.dtype) for name, p in template.items()}
                    if not fresh:
                        leaves, treedef = jax.tree.flatten(state)
                        loaded = [jnp.asarray(z[f"s{i}"], dtype=x.dtype) for i, x in enumerate(leaves)]
                        state = jax.tree.unflatten(treedef, loaded)
                for step in range(k, TOTAL):
                    params, state = run(params, state, step)
                save_npz(root / f"{'fresh' if fresh else 'resumed'}-{cfg}-k{k}.npz", _optax_dump(params, state))


# --------------------------------------------------------------------------- keras
def _keras_configs() -> dict[str, Callable[[], Any]]:
    import keras

    from ftmlopt.keras import FTML

    # name="ftml": the dump is keyed by variable path, which holds the optimizer's name, and Keras
    # numbers default names (ftml, ftml_1, ...) per process.
    return {
        "coupled_clip": lambda: FTML(learning_rate=0.05, coupled_weight_decay=1e-3, clip_gradient=0.5, name="ftml"),
        "decoupled_schedule": lambda: FTML(
            learning_rate=keras.optimizers.schedules.ExponentialDecay(0.05, 2, 0.5), weight_decay=0.05, name="ftml"
        ),
    }


def _keras_setup(factory: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    import keras

    variables = {k: keras.Variable(initial(k).astype(np.float32), name=k) for k in SHAPES}
    opt = factory()
    opt.build(list(variables.values()))
    return variables, opt


def _keras_step(variables: dict[str, Any], opt: Any, step: int) -> None:
    from keras import ops

    grads = [grad(k, step, ops.convert_to_tensor(v), lambda a: ops.convert_to_tensor(a, "float32"))
             for k, v in variables.items()]
    opt.apply_gradients(zip(grads, variables.values()))


def _keras_dump(variables: dict[str, Any], opt: Any) -> dict[str, Any]:
    out = {f"weight/{k}": np.asarray(v.numpy(), dtype=np.float64) for k, v in variables.items()}
    for i, v in enumerate(opt.variables):
        out[f"state/{i}/{v.path}"] = np.asarray(v.numpy(), dtype=np.float64)
    return out


def keras_save(root: Path) -> None:
    for cfg, factory in _keras_configs().items():
        variables, opt = _keras_setup(factory)
        for step in range(TOTAL):
            if step in KS:  # the user's checkpoint: the model's and the optimizer's variables
                arrays = {f"opt{i}": v.numpy() for i, v in enumerate(opt.variables)}
                arrays.update({f"var/{k}": v.numpy() for k, v in variables.items()})
                np.savez(root / f"ckpt-{cfg}-k{step}.npz", **arrays)
            _keras_step(variables, opt, step)
        save_npz(root / f"uninterrupted-{cfg}.npz", _keras_dump(variables, opt))


def keras_resume(root: Path) -> None:
    for cfg, factory in _keras_configs().items():
        for k in KS:
            for fresh in (False, True):
                variables, opt = _keras_setup(factory)
                with np.load(root / f"ckpt-{cfg}-k{k}.npz") as z:
                    for name, v in variables.items():
                        v.assign(z[f"var/{name}"])
                    if not fresh:
                        for i, v in enumerate(opt.variables):
                            v.assign(z[f"opt{i}"])
                for step in range(k, TOTAL):
                    _keras_step(variables, opt, step)
                save_npz(root / f"{'fresh' if fresh else 'resumed'}-{cfg}-k{k}.npz", _keras_dump(variables, opt))


FRONTENDS: dict[str, tuple[Callable[[Path], None], Callable[[Path], None]]] = {
    "numpy": (numpy_save, numpy_resume),
    "torch": (torch_save, torch_resume),
    "optax": (optax_save, optax_resume),
    "keras": (keras_save, keras_resume),
}


def main(argv: list[str]) -> None:
    phase, frontend, root = argv
    if frontend == "optax":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    save, resume = FRONTENDS[frontend]
    (save if phase == "save" else resume)(Path(root))


if __name__ == "__main__":
    main(sys.argv[1:])
