r"""FTML for JAX, as an optax gradient transformation.

Importing this module imports ``jax`` and ``optax`` (``pip install 'ftmlopt[jax]'``); ``import
ftmlopt`` alone never does.

The rule is :mod:`ftmlopt.rule`, written once for every front end. Per element, at step
:math:`t = 1, 2, \dots` with learning rate :math:`\eta_t`:

.. math::

    g' &= \mathrm{clip}(g + \lambda_c w_{t-1},\ c), \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2)\, g'^2, \qquad
    \hat\sigma_t = \sqrt{v_t/(1-\beta_2^t)} + \epsilon \\
    w_t &= \delta\, w_{t-1} - \frac{\eta_t(1-\beta_1)}{1-\beta_1^t}\,\frac{g'}{\hat\sigma_t}
    \qquad (\delta = 1 - \eta_t\lambda_d)

That is the **compact** form (the default, the paper's Theorem 1; state ``v`` and the count).
``compact=False`` gives MXNet's three-state form (``d, v, z`` with :math:`w = -z/d`), equal to it
while nothing but the optimizer writes the weights, evaluated in :func:`ftmlopt.rule.mxnet_step`'s
stable order. :math:`\lambda_c` is ``weight_decay`` (coupled L2 before the clip :math:`c`, MXNet
1.9's order), or :math:`\lambda_d` with ``decoupled_weight_decay=True`` (torch's AdamW-style
``w <- w (1 - lr wd)`` before the step, and ``z`` alike in the MXNet form).

FTML *sets* the new weight, so the transformation needs ``params`` and returns ``new - params``
as its update (optax adds updates). ``p + (n - p)`` equals ``n`` exactly when ``n`` and ``p`` are
within a factor of two of each other; :func:`ftml_direct` returns the new parameters themselves.

Conventions:

* ``learning_rate`` is a float >= 0 or an optax schedule evaluated at ``count`` before the step
  (0 on the first step), as in :func:`optax.scale_by_learning_rate`. **lr 0 is "no step"**: the
  weights do not move, ``v`` takes the gradient in and ``count`` advances (so a schedule that
  warms up from 0 moves on), in both forms; the MXNet form keeps ``d`` and ``z``, which leaves
  it equal to the compact form.
* Half-precision (float16/bfloat16) parameters are computed in float32 and rounded once to their
  dtype; their state is float32 unless ``state_dtype`` says otherwise
  (:func:`ftmlopt.rule.state_dtype`). Hyper-parameters are combined in float64 (the betas are taken
  in the compute dtype, as ``beta**t`` is) and cast to the compute dtype, never to a half type; a
  half-precision hyper-parameter array (what
  :func:`optax.inject_hyperparams` makes for an all-half model unless given
  ``hyperparam_dtype=jnp.float32``) is refused with a ``TypeError``, since ``b2 = 0.999`` is 1.0
  in bfloat16.
* The state is :class:`FTMLCompactState` (``count, v``) or :class:`FTMLState` (``count, d, v,
  z``), ``count`` an int32 scalar; states are made with ``jnp.zeros_like`` so they follow the
  parameters' sharding.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftmlopt import rule

__all__ = ["FTMLCompactState", "FTMLDirect", "FTMLState", "ftml", "ftml_direct"]

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]

_NO_PARAMS = (
    "ftmlopt.optax.ftml needs params: FTML sets each new weight from its state and the current "
    "weight, so call tx.update(grads, state, params)."
)


class FTMLState(NamedTuple):
    """State of :func:`ftml` with ``compact=False`` (MXNet's form): the count and ``d``, ``v``, ``z``."""

    count: jax.Array  # type: ignore[assignment]  # int32 scalar, the number of updates made (shadows tuple.count)
    d: optax.Updates
    v: optax.Updates
    z: optax.Updates


class FTMLCompactState(NamedTuple):
    """State of :func:`ftml` (compact form, the default): the count and ``v``."""

    count: jax.Array  # type: ignore[assignment]  # int32 scalar, the number of updates made (shadows tuple.count)
    v: optax.Updates


State = FTMLState | FTMLCompactState


class FTMLDirect(NamedTuple):
    """The direct form of FTML: ``init(params) -> state`` and ``step(grads, state, params)``.

    ``step`` returns ``(new_params, new_state)``: the new weights themselves, not an update to add.
    """

    init: Callable[[optax.Params], State]
    step: Callable[[optax.Updates, State, optax.Params], tuple[optax.Params, State]]


def _is_array(value: Any) -> bool:
    # inject_hyperparams passes hyper-parameters as (possibly traced) arrays: their values cannot be
    # checked in Python, only their dtype.
    return isinstance(value, jax.Array | np.ndarray | np.generic) and not isinstance(value, numbers.Real)


def _check_hyper(value: Any, check: Callable[[Any, str], Any], name: str) -> Any:
    """Validate a plain number with ``check``; an array must not be of a half (or non-float) type."""
    if _is_array(value):
        dtype = jnp.dtype(value.dtype)
        if rule.dtype_name(dtype) in rule.HALF_DTYPES:
            raise TypeError(
                f"{name} was given as a {dtype.name} array ({value!r}): a half type rounds FTML's "
                f"hyper-parameters (b2 = 0.999 is 1.0 in bfloat16). optax.inject_hyperparams casts "
                f"them to the parameters' dtype; pass hyperparam_dtype=jnp.float32 to it."
            )
        if not jnp.issubdtype(dtype, jnp.floating) and not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(f"{name} must be a real number, got an array of dtype {dtype.name}")
        return value
    return check(value, name)


def _validate(
    learning_rate: Any,
    b1: Any,
    b2: Any,
    eps: Any,
    weight_decay: Any,
    clip_gradient: Any,
    compact: Any,
    decoupled_weight_decay: Any,
    state_dtype: Any,
) -> None:
    if not callable(learning_rate):
        _check_hyper(learning_rate, rule.check_lr, "learning_rate")
    _check_hyper(b1, rule.check_beta, "b1")
    _check_hyper(b2, rule.check_beta, "b2")
    _check_hyper(eps, rule.check_eps, "eps")
    _check_hyper(weight_decay, rule.check_weight_decay, "weight_decay")
    if clip_gradient is not None:
        _check_hyper(clip_gradient, rule.check_clip, "clip_gradient")
    rule.check_bool(compact, "compact")
    rule.check_bool(decoupled_weight_decay, "decoupled_weight_decay")
    if state_dtype is not None:
        try:
            dtype = jnp.dtype(state_dtype)
        except TypeError as err:
            raise TypeError(f"Invalid state_dtype: {state_dtype!r}") from err
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"Invalid state_dtype: {state_dtype!r} (a floating-point dtype is needed)")


def _compute_dtype(dtype: Any) -> Any:
    """float32 for float16/bfloat16, else the parameter's own dtype (floating types only)."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"ftml supports floating-point parameters only, got a leaf of dtype {dtype}")
    return jnp.dtype(rule.compute_dtype(dtype))


def _clip(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    return jnp.clip(x, lo, hi)


def _cast_constants(c: rule.Constants, dtype: Any) -> rule.Constants:
    """Every scalar of ``c`` as a ``dtype`` array (None stays None; ``sign`` stays a Python float)."""
    fields: dict[str, Any] = {
        name: (None if value is None or name == "sign" else jnp.asarray(value, dtype))
        for name, value in c._asdict().items()
    }
    fields["sign"] = c.sign
    return rule.Constants(**fields)


def _hyper(value: Any) -> Any:
    """A Python float for a plain number (combined in float64 by rule.constants), else the array."""
    return float(value) if isinstance(value, numbers.Real) and not _is_array(value) else value


def _make(
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    clip_gradient: float | None,
    compact: bool,
    decoupled_weight_decay: bool,
    state_dtype: Any,
) -> tuple[Callable[[optax.Params], State], Callable[..., tuple[Any, State]]]:
    """Validate the arguments; return ``init`` and ``run(grads, state, params, want_params)``."""
    _validate(learning_rate, b1, b2, eps, weight_decay, clip_gradient, compact, decoupled_weight_decay, state_dtype)
    compact = bool(compact)
    decoupled = bool(decoupled_weight_decay)
    b1, b2, eps, weight_decay = _hyper(b1), _hyper(b2), _hyper(eps), _hyper(weight_decay)
    clip = None if clip_gradient is None else _hyper(clip_gradient)

    def init(params: optax.Params) -> State:
        def zeros(p: jax.Array) -> jax.Array:
            _compute_dtype(p.dtype)  # refuses non-floating leaves
            requested = None if state_dtype is None else jnp.dtype(state_dtype)
            return jnp.zeros_like(p, dtype=jnp.dtype(rule.state_dtype(jnp.dtype(p.dtype), requested)))

        count = jnp.zeros([], jnp.int32)
        v = jax.tree.map(zeros, params)
        if compact:
            return FTMLCompactState(count=count, v=v)
        return FTMLState(count=count, d=jax.tree.map(zeros, params), v=v, z=jax.tree.map(zeros, params))

    def leaf_constants(lr: Any, t: jax.Array, ct: Any) -> rule.Constants:
        # The traced count makes beta**t an array in the compute dtype (never a half type), so the
        # betas are taken in that dtype too: 1 - beta and 1 - beta**t then come from the same beta,
        # and v_1 / (1 - beta2) is g^2 exactly (1 - beta2 in float64 against 1 - beta2**t in float32
        # differ by 1e-5 relative for beta2 = 0.999). The other Python numbers combine in float64.
        c = rule.constants(
            lr=_hyper(lr) if not _is_array(lr) else jnp.asarray(lr, ct),
            t=t.astype(ct),
            beta1=jnp.asarray(b1, ct),
            beta2=jnp.asarray(b2, ct),
            eps=eps,
            weight_decay=weight_decay,
            decoupled=decoupled,
            clip=clip,
        )
        return _cast_constants(c, ct)

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
        if _is_array(lr):
            _check_hyper(lr, rule.check_lr, "learning_rate")  # a schedule's dtype is checked too
        count = optax.safe_increment(state.count)

        if compact:

            def leaf_compact(p: jax.Array, g: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
                ct = _compute_dtype(p.dtype)
                c = leaf_constants(lr, count, ct)
                w = p.astype(ct)
                new, new_v = rule.compact_step(w, g.astype(ct), v.astype(ct), c, sqrt=jnp.sqrt, clip=_clip)
                new = new.astype(p.dtype)
                return (new if want_params else new - p), new_v.astype(v.dtype)

            pairs = jax.tree.map(leaf_compact, params, grads, state.v)
            out, v = _unzip(params, pairs, 2)
            return out, FTMLCompactState(count=count, v=v)

        def leaf_mxnet(p: jax.Array, g: jax.Array, d: jax.Array, v: jax.Array, z: jax.Array) -> tuple:
            ct = _compute_dtype(p.dtype)
            c = leaf_constants(lr, count, ct)
            w, g = p.astype(ct), g.astype(ct)
            new, d_t, v_t, z_t = rule.mxnet_step(
                w, g, d.astype(ct), v.astype(ct), z.astype(ct), c,
                sqrt=jnp.sqrt, clip=_clip, where=jnp.where, stable=True,
            )
            new = new.astype(p.dtype)
            return (new if want_params else new - p), d_t.astype(d.dtype), v_t.astype(v.dtype), z_t.astype(z.dtype)

        assert isinstance(state, FTMLState)
        quads = jax.tree.map(leaf_mxnet, params, grads, state.d, state.v, state.z)
        out, d, v, z = _unzip(params, quads, 4)
        return out, FTMLState(count=count, d=d, v=v, z=z)

    return init, run


def _unzip(structure: Any, tree_of_tuples: Any, n: int) -> tuple[Any, ...]:
    """Split a tree whose leaves are n-tuples (laid out like ``structure``) into n trees."""
    return tuple(jax.tree.map(lambda _, leaf, i=i: leaf[i], structure, tree_of_tuples) for i in range(n))


def ftml_direct(
    learning_rate: ScalarOrSchedule = 2.5e-3,
    b1: float = 0.6,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_gradient: float | None = None,
    compact: bool = True,
    *,
    decoupled_weight_decay: bool = False,
    state_dtype: Any = None,
) -> FTMLDirect:
    r"""FTML in direct form: ``step`` returns the new parameters rather than an update.

    Same rule, arguments and state as :func:`ftml`; use it when the new weights must be exactly
    the rule's (``optax.apply_updates(p, n - p)`` can differ from ``n`` by one rounding).

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
    init, run = _make(
        learning_rate, b1, b2, eps, weight_decay, clip_gradient, compact, decoupled_weight_decay, state_dtype
    )

    def step(grads: optax.Updates, state: State, params: optax.Params) -> tuple[optax.Params, State]:
        return run(grads, state, params, want_params=True)

    return FTMLDirect(init=init, step=step)


def ftml(
    learning_rate: ScalarOrSchedule = 2.5e-3,
    b1: float = 0.6,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip_gradient: float | None = None,
    compact: bool = True,
    *,
    decoupled_weight_decay: bool = False,
    state_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""FTML (Follow the Moving Leader, Zheng & Kwok, ICML 2017) as an optax transformation.

    .. math::

        \text{update} = -\delta_t' w_{t-1}
            - \frac{\eta_t(1-\beta_1)}{1-\beta_1^t}\,\frac{g'}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon},
        \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g'^2

    (:math:`\delta_t' = \eta_t\lambda_d` with decoupled decay, else 0; :math:`g'` the gradient
    with coupled L2 and clipping; see the module docstring and :mod:`ftmlopt.rule`).

    ``update(updates, state, params)`` **requires** ``params`` (a ``ValueError`` otherwise) and
    ignores extra keyword arguments. Works under :func:`jax.jit`, with :func:`optax.chain`,
    :func:`optax.inject_hyperparams` (give it ``hyperparam_dtype=jnp.float32`` for a model whose
    parameters are all half precision), :class:`optax.MultiSteps`, any pytree of
    float16/bfloat16/float32/float64 leaves, and sharded parameters.

    Args:
        learning_rate: :math:`\eta` >= 0 (0: no step) or an optax schedule ``count -> lr``.
        b1: :math:`\beta_1` in [0, 1).
        b2: :math:`\beta_2` in [0, 1).
        eps: :math:`\epsilon` >= 0, added *outside* the square root (MXNet's convention).
        weight_decay: :math:`\lambda` >= 0. Coupled L2 added to the gradient before clipping
            (MXNet 1.9's ``wd``) unless ``decoupled_weight_decay``.
        clip_gradient: None (off) or a finite bound > 0 for element-wise clipping of :math:`g'`.
        compact: True (default): the compact form, state ``v``. False: MXNet's three-state form,
            state ``d, v, z`` (pulls outside edits of the weights back, as MXNet does).
        decoupled_weight_decay: apply ``weight_decay`` as ``w <- w (1 - lr wd)`` before the step
            (and ``z`` alike in the MXNet form), as ``ftmlopt.torch.FTML`` does.
        state_dtype: dtype of the state; None: the parameter's dtype, float32 for half types.

    Returns:
        An ``optax.GradientTransformationExtraArgs``.

    Raises:
        TypeError, ValueError: on a bad argument, naming it (values of arrays passed by
            ``inject_hyperparams`` cannot be checked; their dtype is).

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
    init, run = _make(
        learning_rate, b1, b2, eps, weight_decay, clip_gradient, compact, decoupled_weight_decay, state_dtype
    )

    def update(
        updates: optax.Updates, state: State, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, State]:
        del extra_args
        return run(updates, state, params, want_params=False)

    return optax.GradientTransformationExtraArgs(init, update)
