r"""FTML for JAX, as an optax gradient transformation.

Importing this module imports ``jax`` and ``optax`` (``pip install 'ftmlopt[jax]'``); ``import
ftmlopt`` alone never does.

The rule, per element, with :math:`t = 1, 2, \dots` and states :math:`d_0 = v_0 = z_0 = 0`:

.. math::

    g' &= \mathrm{clip}(g + \lambda w_{t-1},\ c) \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g'^2 \\
    d_t &= \frac{1-\beta_1^t}{\eta_t}\Big(\sqrt{v_t/(1-\beta_2^t)} + \epsilon\Big) \\
    z_t &= \beta_1 z_{t-1} + (1-\beta_1)\, g' - (d_t - \beta_1 d_{t-1})\, w_{t-1} \\
    w_t &= -z_t / d_t

(:math:`\lambda` is ``weight_decay``, coupled and added *before* clipping as in MXNet 1.9;
:math:`c` is ``clip_gradient``; :math:`\epsilon` is outside the square root.) The arithmetic is
:mod:`ftmlopt.core.functional`, shared with the Keras front end.

Why FTML is not a chain of ``scale_by_*`` steps: the new weight is *set* from the state
(:math:`w_t = -z_t/d_t`) and :math:`z_t` needs the current weight, so the transformation needs
``params`` and returns ``new_params - params`` as its update (optax's sign convention: updates
are added). ``p + (n - p)`` equals ``n`` exactly whenever ``n`` and ``p`` are within a factor of two
of each other, and may differ from it by one rounding otherwise (on the first step from a zero
weight, or where a weight changes sign). :func:`ftml_direct` returns the new parameters
themselves for callers that need MXNet's numbers bit for bit.

Conventions:

* ``learning_rate`` may be a float or an optax schedule, evaluated at the step count *before* the
  step (0 on the first step), as in :func:`optax.scale_by_learning_rate`.
* float16 and bfloat16 parameters are computed in float32 and their states are **stored in
  float32** (the weight is rebuilt from ``z / d`` every step, so half-precision states would add
  a rounding error of the weight's own size each step); the new weight is rounded once to the
  parameter dtype. float32 and float64 parameters keep states of their own dtype.
* Hyper-parameters are used at the compute dtype's precision (MXNet's operator rounds them to
  float32 first; for float64 parity with :func:`ftmlopt.ftml_update`, use values that are exact
  in float32).
* The state is a NamedTuple (:class:`FTMLState`, or :class:`FTMLCompactState` with
  ``compact=True``) with ``count`` an int32 scalar; states are created with
  :func:`jax.numpy.zeros_like`, so they follow the sharding of the parameters.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftmlopt.core import functional as F
from ftmlopt.core.validation import check_beta, check_bool, check_epsilon, check_lr, check_nonnegative

__all__ = ["FTMLCompactState", "FTMLDirect", "FTMLState", "ftml", "ftml_direct"]

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]

_NO_PARAMS = (
    "ftmlopt.optax.ftml needs params: FTML sets each new weight from its state and the current "
    "weight, so call tx.update(grads, state, params)."
)


class FTMLState(NamedTuple):
    """State of :func:`ftml` (full form): the step count and the per-parameter ``d``, ``v``, ``z``."""

    count: jax.Array  # int32 scalar, the number of steps taken
    d: optax.Updates
    v: optax.Updates
    z: optax.Updates


class FTMLCompactState(NamedTuple):
    """State of :func:`ftml` with ``compact=True``: the step count and ``v`` only."""

    count: jax.Array  # int32 scalar, the number of steps taken
    v: optax.Updates


State = FTMLState | FTMLCompactState


class FTMLDirect(NamedTuple):
    """The direct form of FTML: ``init(params) -> state`` and ``step(grads, state, params)``.

    ``step`` returns ``(new_params, new_state)``: the new weights themselves, not an update to add.
    """

    init: Callable[[optax.Params], State]
    step: Callable[[optax.Updates, State, optax.Params], tuple[optax.Params, State]]


def _is_traced_or_array(value: Any) -> bool:
    # inject_hyperparams passes hyper-parameters as (possibly traced) arrays: these cannot be
    # checked in Python, so only plain numbers are validated.
    return isinstance(value, (jax.Array, np.ndarray)) and not isinstance(value, numbers.Real)


def _validate(
    learning_rate: Any,
    b1: Any,
    b2: Any,
    eps: Any,
    weight_decay: Any,
    clip_gradient: Any,
    compact: Any,
) -> None:
    if not callable(learning_rate) and not _is_traced_or_array(learning_rate):
        check_lr(learning_rate, "learning_rate")
    for value, name in ((b1, "b1"), (b2, "b2")):
        if not _is_traced_or_array(value):
            check_beta(value, name)
    if not _is_traced_or_array(eps):
        check_epsilon(eps, "eps")
    if not _is_traced_or_array(weight_decay):
        check_nonnegative(weight_decay, "weight_decay")
    if clip_gradient is not None and not _is_traced_or_array(clip_gradient):
        if isinstance(clip_gradient, bool) or not isinstance(clip_gradient, numbers.Real):
            raise TypeError(
                f"clip_gradient must be None or a real number, got {clip_gradient!r} "
                f"of type {type(clip_gradient).__name__}"
            )
        if not np.isfinite(clip_gradient) or clip_gradient <= 0:
            raise ValueError(f"Invalid clip_gradient: must be None or finite and > 0, got {clip_gradient!r}")
    check_bool(compact, "compact")


def _compute_dtype(dtype: Any) -> Any:
    """float32 for float16/bfloat16 (and other sub-32-bit floats), else the dtype itself."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"ftml supports floating-point parameters only, got a leaf of dtype {dtype}")
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def _clip(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    return jnp.clip(x, lo, hi)


def _make(
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    clip_gradient: float | None,
    compact: bool,
) -> tuple[Callable[[optax.Params], State], Callable[..., tuple[Any, State]]]:
    """Validate the arguments; return ``init`` and ``run(grads, state, params, want_params)``."""
    _validate(learning_rate, b1, b2, eps, weight_decay, clip_gradient, compact)
    compact = bool(compact)
    no_wd = isinstance(weight_decay, numbers.Real) and float(weight_decay) == 0.0

    def init(params: optax.Params) -> State:
        def zeros(p: jax.Array) -> jax.Array:
            return jnp.zeros_like(p, dtype=_compute_dtype(p.dtype))

        count = jnp.zeros([], jnp.int32)
        v = jax.tree.map(zeros, params)
        if compact:
            return FTMLCompactState(count=count, v=v)
        return FTMLState(count=count, d=jax.tree.map(zeros, params), v=v, z=jax.tree.map(zeros, params))

    def scalars(dtype: Any, lr: Any, t: jax.Array) -> F.StepScalars:
        def c(x: Any) -> jax.Array:
            return jnp.asarray(x, dtype)

        return F.step_scalars(
            lr=c(lr),
            t=t.astype(dtype),
            beta1=c(b1),
            beta2=c(b2),
            epsilon=c(eps),
            wd=None if no_wd else c(weight_decay),
            clip=None if clip_gradient is None else c(clip_gradient),
        )

    def run(grads: optax.Updates, state: State, params: optax.Params, want_params: bool) -> tuple[Any, State]:
        if params is None:
            raise ValueError(_NO_PARAMS)
        expected_state = FTMLCompactState if compact else FTMLState
        if not isinstance(state, expected_state):
            raise TypeError(
                f"state must be the {expected_state.__name__} made by this transformation's init "
                f"(compact={compact}), got {type(state).__name__}"
            )
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        count = optax.safe_increment(state.count)

        if compact:

            def leaf_compact(p: jax.Array, g: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
                ct = _compute_dtype(p.dtype)
                s = scalars(ct, lr, count)
                delta, v = F.compact_delta(p.astype(ct), g.astype(ct), v, s, sqrt=jnp.sqrt, clip=_clip)
                out = (p.astype(ct) + delta).astype(p.dtype) if want_params else delta.astype(p.dtype)
                return out, v

            pairs = jax.tree.map(leaf_compact, params, grads, state.v)
            out, v = _unzip(params, pairs, 2)
            return out, FTMLCompactState(count=count, v=v)

        def leaf_full(p: jax.Array, g: jax.Array, d: jax.Array, v: jax.Array, z: jax.Array) -> tuple:
            ct = _compute_dtype(p.dtype)
            s = scalars(ct, lr, count)
            new, d, v, z = F.full_step(p.astype(ct), g.astype(ct), d, v, z, s, sqrt=jnp.sqrt, clip=_clip)
            new = new.astype(p.dtype)
            return (new if want_params else new - p), d, v, z

        quads = jax.tree.map(leaf_full, params, grads, state.d, state.v, state.z)
        out, d, v, z = _unzip(params, quads, 4)
        return out, FTMLState(count=count, d=d, v=v, z=z)

    return init, run


def ftml_direct(
    learning_rate: ScalarOrSchedule = 2.5e-3,
    b1: float = 0.6,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_gradient: float | None = None,
    compact: bool = False,
) -> FTMLDirect:
    r"""FTML in direct form: ``step`` returns the new parameters rather than an update.

    Same rule, arguments and state as :func:`ftml` (see there and the module docstring); use it
    when the new weights must be exactly :math:`-z_t/d_t` (bit-for-bit parity with MXNet's
    operator), since ``optax.apply_updates(p, n - p)`` can differ from ``n`` by one rounding.

    Example:
        >>> import jax.numpy as jnp
        >>> from ftmlopt.optax import ftml_direct
        >>> opt = ftml_direct(learning_rate=0.1)
        >>> params = {"w": jnp.array([1.0, -2.0])}
        >>> state = opt.init(params)
        >>> params, state = opt.step({"w": jnp.array([0.5, 0.0])}, state, params)
        >>> params["w"].round(4), int(state.count)
        (Array([ 0.9, -2. ], dtype=float32), 1)
    """
    init, run = _make(learning_rate, b1, b2, eps, weight_decay, clip_gradient, compact)

    def step(grads: optax.Updates, state: State, params: optax.Params) -> tuple[optax.Params, State]:
        return run(grads, state, params, want_params=True)

    return FTMLDirect(init=init, step=step)


def _unzip(structure: Any, tree_of_tuples: Any, n: int) -> tuple[Any, ...]:
    """Split a tree whose leaves are n-tuples (laid out like ``structure``) into n trees."""
    treedef = jax.tree.structure(structure)
    leaves = treedef.flatten_up_to(tree_of_tuples)
    return tuple(treedef.unflatten([leaf[i] for leaf in leaves]) for i in range(n))


def ftml(
    learning_rate: ScalarOrSchedule = 2.5e-3,
    b1: float = 0.6,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_gradient: float | None = None,
    compact: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""FTML (Follow the Moving Leader, Zheng & Kwok, ICML 2017) as an optax transformation.

    .. math::

        g' &= \mathrm{clip}(g + \lambda w_{t-1},\ c), \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g'^2 \\
        d_t &= \tfrac{1-\beta_1^t}{\eta_t}\big(\sqrt{v_t/(1-\beta_2^t)} + \epsilon\big), \qquad
        z_t = \beta_1 z_{t-1} + (1-\beta_1) g' - (d_t - \beta_1 d_{t-1}) w_{t-1} \\
        \text{update} &= w_t - w_{t-1}, \qquad w_t = -z_t/d_t

    With ``compact=True`` the update is the paper's equivalent closed form
    :math:`-\frac{\eta_t(1-\beta_1)}{1-\beta_1^t}\,\frac{g'}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon}` and
    only :math:`v` is stored (a third of the memory; the two forms agree in exact arithmetic as
    long as nothing else edits the weights between steps).

    ``update(updates, state, params)`` **requires** ``params`` (a ``ValueError`` otherwise) and
    ignores extra keyword arguments. Works under :func:`jax.jit`, with :func:`optax.chain`
    (e.g. after :func:`optax.clip_by_global_norm`), :func:`optax.inject_hyperparams`, any
    pytree of float16/bfloat16/float32/float64 leaves, and sharded parameters.

    Args:
        learning_rate: :math:`\eta`, a float > 0 or an optax schedule ``count -> lr``.
        b1: :math:`\beta_1` in [0, 1).
        b2: :math:`\beta_2` in [0, 1).
        eps: :math:`\epsilon` >= 0, added *outside* the square root (MXNet's convention).
        weight_decay: :math:`\lambda` >= 0, coupled L2 added to the gradient before clipping
            (MXNet 1.9's ``wd``). For decoupled decay chain ``optax.add_decayed_weights`` *before*
            ``ftml`` only with care: FTML rebuilds the weight from its state.
        clip_gradient: None (off) or a finite bound > 0 for element-wise clipping of
            :math:`g'` (MXNet's ``clip_gradient``).
        compact: store only ``v`` and use the closed form (see above).

    Returns:
        An ``optax.GradientTransformationExtraArgs``.

    Raises:
        TypeError, ValueError: on a bad argument (checked for plain numbers; arrays passed by
            ``inject_hyperparams`` are taken as they are).

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from ftmlopt.optax import ftml
        >>> tx = ftml(learning_rate=0.2)
        >>> params = {"w": jnp.array([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> loss = lambda p: jnp.sum(p["w"] ** 2)
        >>> for _ in range(50):
        ...     updates, state = tx.update(jax.grad(loss)(params), state, params)
        ...     params = optax.apply_updates(params, updates)
        >>> bool(loss(params) < 1e-2)
        True

    References:
        S. Zheng and J. T. Kwok, "Follow the Moving Leader in Deep Learning", ICML 2017.
    """
    init, run = _make(learning_rate, b1, b2, eps, weight_decay, clip_gradient, compact)

    def update(
        updates: optax.Updates, state: State, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, State]:
        del extra_args
        return run(updates, state, params, want_params=False)

    return optax.GradientTransformationExtraArgs(init, update)
