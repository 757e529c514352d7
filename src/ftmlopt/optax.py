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

The compact form is built as optax builds its optimizers: :func:`scale_by_ftml` gives the direction
(no ``params`` needed) and :func:`ftml` chains it with optax's ``add_decayed_weights``, ``clip`` and
``scale_by_learning_rate``, so ``update(grads, state)`` needs ``params`` only for a weight decay.
The MXNet form *sets* each new weight from its state and the weight, so it needs ``params`` and
returns ``new - params`` (optax adds updates); :func:`ftml_direct` returns the rule's new
parameters themselves, in either form.

Conventions:

* ``learning_rate`` is a float >= 0 or an optax schedule evaluated at ``count`` before the step
  (0 on the first step), as in :func:`optax.scale_by_learning_rate`. **lr 0 is "no step"**: the
  weights do not move, ``v`` takes the gradient in and ``count`` advances (so a schedule that
  warms up from 0 moves on), in both forms; the MXNet form keeps ``d`` and ``z``, which leaves
  it equal to the compact form.
* Half-precision (float16/bfloat16) parameters are computed in float32 and rounded once to their
  dtype (the compact form returns float32 updates for them, which :func:`optax.apply_updates`
  rounds once); their state is float32 unless ``state_dtype`` says otherwise
  (:func:`ftmlopt.rule.state_dtype`), and a float64 state makes the step float64
  (:func:`ftmlopt.rule.compute_dtype`). Hyper-parameters are combined in float64 (the betas are taken
  in the compute dtype, as ``beta**t`` is) and cast to the compute dtype, never to a half type; a
  half-precision hyper-parameter array (what
  :func:`optax.inject_hyperparams` makes for an all-half model unless given
  ``hyperparam_dtype=jnp.float32``) is refused with a ``TypeError``, since ``b2 = 0.999`` is 1.0
  in bfloat16.
* The states are :class:`ScaleByFTMLState` (``count, v``; :func:`ftml`'s compact form holds it in
  :class:`FTMLChainState`, whose ``.count`` and ``.v`` read it), :class:`FTMLCompactState`
  (``count, v``, :func:`ftml_direct`) and :class:`FTMLState` (``count, d, v, z``, the MXNet
  form), ``count`` an int32 scalar; states are made with ``jnp.zeros_like`` so they follow the
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

from ftmlopt import lowbit, rule

__all__ = [
    "FTMLChainState",
    "FTMLCompactState",
    "FTMLDirect",
    "FTMLState",
    "QuantizedV",
    "ScaleByFTMLState",
    "from_compact_state",
    "ftml",
    "ftml_direct",
    "scale_by_ftml",
]

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]

_NO_PARAMS = (
    "ftmlopt.optax.ftml(compact=False) (MXNet's form) and ftml_direct need params: they set each new "
    "weight from their state and the current weight, so call tx.update(grads, state, params). The "
    "compact form (the default) needs none unless a weight decay is on."
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
    rule.check_state_dtype(state_dtype, "state_dtype")


def _compute_dtype(dtype: Any, state: Any = None) -> Any:
    """:func:`ftmlopt.rule.compute_dtype` as a JAX dtype; floating types only."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"ftml supports floating-point parameters only, got a leaf of dtype {dtype}")
    return jnp.dtype(rule.compute_dtype(dtype, state))


def _state_zeros(p: jax.Array, state_dtype: Any) -> jax.Array:
    """Zeros like ``p`` in the state dtype (``jnp.zeros_like``: they follow ``p``'s sharding)."""
    _compute_dtype(p.dtype)  # refuses non-floating leaves
    return jnp.zeros_like(p, dtype=jnp.dtype(rule.state_dtype(jnp.dtype(p.dtype), state_dtype)))


def _clip(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    return jnp.clip(x, lo, hi)


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
            return _state_zeros(p, rule.check_state_dtype(state_dtype))

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
        return c.cast(lambda x: jnp.asarray(x, ct))

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
                ct = _compute_dtype(p.dtype, v.dtype)
                c = leaf_constants(lr, count, ct)
                w = p.astype(ct)
                new, new_v = rule.compact_step(w, g.astype(ct), v.astype(ct), c, sqrt=jnp.sqrt, clip=_clip)
                new = new.astype(p.dtype)
                return (new if want_params else new - p), new_v.astype(v.dtype)

            pairs = jax.tree.map(leaf_compact, params, grads, state.v)
            out, v = _unzip(params, pairs, 2)
            return out, FTMLCompactState(count=count, v=v)

        def leaf_mxnet(p: jax.Array, g: jax.Array, d: jax.Array, v: jax.Array, z: jax.Array) -> tuple:
            ct = _compute_dtype(p.dtype, v.dtype)
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
    learning_rate: ScalarOrSchedule = rule.DEFAULT_LR,
    b1: float = rule.DEFAULT_BETA1,
    b2: float = rule.DEFAULT_BETA2,
    eps: float = rule.DEFAULT_EPS,
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


class QuantizedV(NamedTuple):
    """A leaf of ``v`` in low bits (``state_bits`` 8 or 4, :mod:`ftmlopt.lowbit`): uint8 codes, float32 scales.

    ``codes`` holds one code per element (8-bit) or two per byte (4-bit) of the flattened leaf,
    ``scales`` one float32 per block of 128 elements.
    """

    codes: jax.Array
    scales: jax.Array


def _check_state_bits(state_bits: Any, compact: Any = True) -> int:
    """``state_bits`` (None is 32: a default :func:`optax.inject_hyperparams` leaves alone) and the form it needs."""
    bits = 32 if state_bits is None else lowbit.check_state_bits(state_bits)
    if bits < 32 and compact is not True:
        raise ValueError(
            f"Invalid state_bits: {bits} with compact=False (MXNet's three-state form keeps d, v and z in floating "
            "point; low-bit state needs the compact form)"
        )
    return bits


class ScaleByFTMLState(NamedTuple):
    """State of :func:`scale_by_ftml`: the count and ``v`` (a NamedTuple; new fields go at the end)."""

    count: jax.Array  # type: ignore[assignment]  # int32 scalar, the number of updates made (shadows tuple.count)
    v: optax.Updates


def scale_by_ftml(
    b1: float = rule.DEFAULT_BETA1,
    b2: float = rule.DEFAULT_BETA2,
    eps: float = rule.DEFAULT_EPS,
    *,
    state_dtype: Any = None,
    state_bits: int | None = None,
) -> optax.GradientTransformation:
    r"""FTML's direction (the compact form, the paper's Theorem 1), for use in an optax chain.

    At step :math:`t = 1, 2, \dots`, per element, for incoming updates :math:`g`:

    .. math::

        v_t = \beta_2 v_{t-1} + (1-\beta_2)\, g^2, \qquad
        \text{out} = \frac{1-\beta_1}{1-\beta_1^t}\,\frac{g}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    The sign is :func:`optax.scale_by_adam`'s: the direction of increase, which
    :func:`optax.scale_by_learning_rate` negates and scales, so that
    ``chain(scale_by_ftml(), scale_by_learning_rate(lr))`` is FTML without options. Needs no
    ``params``. It is :func:`ftmlopt.rule.compact_step` at lr 1 from ``w = 0``, negated (exact).

    Weight decay and clipping are optax's own pieces around it: coupled L2 is
    ``optax.add_decayed_weights(wd)`` *before* it (it feeds ``v``), element-wise clipping
    ``optax.clip(c)`` before it (after the L2, MXNet's order), decoupled decay
    ``optax.add_decayed_weights(wd, mask)`` *after* it, as in :func:`optax.adamw`. :func:`ftml` builds
    exactly that chain.

    dtypes: the state ``v`` has ``state_dtype`` (None: the parameter's dtype, float32 for
    float16/bfloat16, :func:`ftmlopt.rule.state_dtype`). Each leaf is computed in
    :func:`ftmlopt.rule.compute_dtype` of the update's and ``v``'s dtypes (float32 for half types,
    float64 when either is float64) and the direction is returned in that dtype, so that
    :func:`optax.scale_by_learning_rate` multiplies in it and :func:`optax.apply_updates` rounds a
    half-precision weight once. ``b1, b2`` are taken in the compute dtype (as ``b**t`` is) and the
    other constants combined in float64 first, never in a half type; a half-precision array
    hyper-parameter (from :func:`optax.inject_hyperparams` without ``hyperparam_dtype``) is refused.

    Low-bit state: with ``state_bits`` 8 or 4 every leaf of at least
    :data:`ftmlopt.lowbit.MIN_ELEMENTS` elements keeps its ``v`` as a :class:`QuantizedV` (about
    1.03 / 0.53 bytes per element) and is stepped by :func:`ftmlopt.lowbit.compact_step` (the rule's
    step from the decoded ``v``, requantized with stochastic rounding whose bits come from the leaf's
    index in the tree, the count and the element's index: deterministic, the same on every replica);
    smaller leaves keep float ``v``.

    Args:
        b1: :math:`\beta_1` in [0, 1).
        b2: :math:`\beta_2` in [0, 1).
        eps: :math:`\epsilon` >= 0, added outside the square root (MXNet's convention).
        state_dtype: dtype of ``v`` (any framework's floating dtype or its name), or None.
        state_bits: None or 32 (float ``v``, the default), 8 or 4. (None rather than 32 by default so
            that :func:`optax.inject_hyperparams` leaves it out: it is a static choice of layout.)

    Returns:
        An ``optax.GradientTransformation`` with state :class:`ScaleByFTMLState` ``(count, v)``.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from ftmlopt.optax import scale_by_ftml
        >>> tx = optax.chain(optax.clip_by_global_norm(1.0), scale_by_ftml(), optax.scale_by_learning_rate(0.1))
        >>> params = {"w": jnp.array([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": jnp.array([0.5, 0.0])}, state)  # no params needed
        >>> optax.apply_updates(params, updates)["w"].round(4)
        Array([ 0.9, -2. ], dtype=float32)
    """
    _check_hyper(b1, rule.check_beta, "b1")
    _check_hyper(b2, rule.check_beta, "b2")
    _check_hyper(eps, rule.check_eps, "eps")
    requested = rule.check_state_dtype(state_dtype, "state_dtype")
    bits = _check_state_bits(state_bits)
    b1, b2, eps = _hyper(b1), _hyper(b2), _hyper(eps)
    ops = lowbit.ops_for(jnp.zeros(()))

    def zeros(p: jax.Array) -> Any:
        if lowbit.is_quantized(int(np.prod(p.shape)), bits):
            codes, scales = lowbit.zeros_state(int(np.prod(p.shape)), bits, ops=ops)
            return QuantizedV(codes=codes, scales=scales)
        return _state_zeros(p, requested)

    def init(params: optax.Params) -> ScaleByFTMLState:
        if bits == 32:
            return ScaleByFTMLState(
                count=jnp.zeros([], jnp.int32), v=jax.tree.map(lambda p: _state_zeros(p, requested), params)
            )
        leaves, treedef = jax.tree.flatten(params)
        v = jax.tree.unflatten(treedef, [zeros(p) for p in leaves])
        return ScaleByFTMLState(count=jnp.zeros([], jnp.int32), v=v)

    def update(
        updates: optax.Updates, state: ScaleByFTMLState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByFTMLState]:
        del params
        if not isinstance(state, ScaleByFTMLState):
            raise TypeError(
                f"state must be the ScaleByFTMLState made by scale_by_ftml's init, got {type(state).__name__}"
            )
        count = optax.safe_increment(state.count)

        def leaf(g: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
            ct = _compute_dtype(g.dtype, v.dtype)
            # lr 1: step_size is (1 - b1) / (1 - b1**t) exactly. Betas in the compute dtype, as b**t is.
            c = rule.constants(
                lr=1.0, t=count.astype(ct), beta1=jnp.asarray(b1, ct), beta2=jnp.asarray(b2, ct), eps=eps
            ).cast(lambda x: jnp.asarray(x, ct))
            moved, v_t = rule.compact_step(jnp.zeros((), ct), g.astype(ct), v.astype(ct), c, sqrt=jnp.sqrt, clip=_clip)
            return -moved, v_t.astype(v.dtype)  # 0 - x, negated: x exactly

        if bits == 32:
            pairs = jax.tree.map(leaf, updates, state.v)
            direction, v = _unzip(updates, pairs, 2)
            return direction, ScaleByFTMLState(count=count, v=v)

        def low_leaf(g: jax.Array, q: QuantizedV, seed: int) -> tuple[jax.Array, QuantizedV]:
            ct = _compute_dtype(g.dtype)
            c = rule.constants(
                lr=1.0, t=count.astype(ct), beta1=jnp.asarray(b1, ct), beta2=jnp.asarray(b2, ct), eps=eps
            ).cast(lambda x: jnp.asarray(x, ct))
            moved, codes, scales = lowbit.compact_step(
                jnp.zeros(g.shape, ct), g.astype(ct), q.codes, q.scales, c, bits=bits, seed=seed, step=count, ops=ops
            )
            return -moved, QuantizedV(codes=codes, scales=scales)

        g_leaves, treedef = jax.tree.flatten(updates)
        v_leaves = jax.tree.leaves(state.v, is_leaf=lambda x: isinstance(x, QuantizedV))
        out = [
            low_leaf(g, v, i) if isinstance(v, QuantizedV) else leaf(g, v)
            for i, (g, v) in enumerate(zip(g_leaves, v_leaves, strict=True))
        ]
        return (jax.tree.unflatten(treedef, [d for d, _ in out]),
                ScaleByFTMLState(count=count, v=jax.tree.unflatten(treedef, [v for _, v in out])))

    return optax.GradientTransformation(init, update)


class FTMLChainState(NamedTuple):
    """State of :func:`ftml` in the compact form: the states of its chain, in order.

    ``count`` and ``v`` read the :class:`ScaleByFTMLState` inside (the fields of the old
    ``FTMLCompactState``), so ``state.count`` and ``state.v`` keep working.
    """

    inner: tuple[Any, ...]

    @property
    def ftml(self) -> ScaleByFTMLState:
        """The :func:`scale_by_ftml` state of the chain."""
        return next(s for s in self.inner if isinstance(s, ScaleByFTMLState))

    @property
    def count(self) -> jax.Array:  # type: ignore[override]  # shadows tuple.count, as FTMLCompactState's field did
        """The number of FTML steps made (int32 scalar)."""
        return self.ftml.count

    @property
    def v(self) -> optax.Updates:
        """FTML's second moment ``v``, a tree like the parameters."""
        return self.ftml.v


def from_compact_state(fresh: Any, old: Any) -> FTMLChainState:
    """``fresh`` (``tx.init(params)`` of :func:`ftml`) holding ``old``'s ``count`` and ``v``.

    ``old`` is an :class:`FTMLCompactState`: the state of :func:`ftml` before it was an optax
    chain (a checkpoint), or of :func:`ftml_direct`. A learning-rate schedule's count (optax's
    ``ScaleByScheduleState``) is set to ``old.count`` too, so the schedule goes on where it was.

    Example:
        >>> import jax.numpy as jnp
        >>> from ftmlopt.optax import ftml, ftml_direct, from_compact_state
        >>> params = jnp.ones(2)
        >>> direct = ftml_direct(0.1)
        >>> _, old = direct.step(jnp.ones(2), direct.init(params), params)
        >>> state = from_compact_state(ftml(0.1).init(params), old)
        >>> int(state.count), bool((state.v == old.v).all())
        (1, True)
    """
    if not isinstance(old, FTMLCompactState) or not isinstance(fresh, FTMLChainState):
        raise TypeError(
            f"from_compact_state(fresh, old) takes an FTMLChainState and an FTMLCompactState, got "
            f"{type(fresh).__name__} and {type(old).__name__}"
        )

    def convert(s: Any) -> Any:
        if isinstance(s, ScaleByFTMLState):
            return s._replace(count=old.count, v=old.v)
        if isinstance(s, optax.ScaleByScheduleState):
            return s._replace(count=old.count)
        return s

    return FTMLChainState(inner=tuple(convert(s) for s in fresh.inner))


def _needs_params(tx: optax.GradientTransformation, what: str) -> optax.GradientTransformation:
    """``tx`` (a weight decay) with a ValueError naming ``what`` when ``update`` is called without
    params, and handed the params in their compute dtype: ``wd * w`` of a bfloat16 ``w`` is then
    taken in float32, as the rule takes it, not with ``wd`` rounded to bfloat16."""

    def update(updates: optax.Updates, state: Any, params: optax.Params | None = None) -> tuple[Any, Any]:
        if params is None:
            raise ValueError(
                f"ftmlopt.optax.ftml with {what} needs params (the decay reads the weights): call "
                f"tx.update(grads, state, params). Without weight decay it needs none."
            )
        in_compute_dtype = jax.tree.map(lambda p: p.astype(_compute_dtype(p.dtype)), params)
        out: tuple[Any, Any] = tx.update(updates, state, in_compute_dtype)
        return out

    return optax.GradientTransformation(tx.init, update)


def _is_on(value: Any) -> bool:
    """An option is on unless it is the plain number 0 (an injected array is always on)."""
    return _is_array(value) or value != 0.0


def ftml(
    learning_rate: ScalarOrSchedule = rule.DEFAULT_LR,
    b1: float = rule.DEFAULT_BETA1,
    b2: float = rule.DEFAULT_BETA2,
    eps: float = rule.DEFAULT_EPS,
    weight_decay: float | None = None,
    clip_gradient: float | None = None,
    compact: bool = True,
    *,
    decoupled_weight_decay: bool = False,
    mask: Any = None,
    state_dtype: Any = None,
    state_bits: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""FTML (Follow the Moving Leader, Zheng & Kwok, ICML 2017) as an optax transformation.

    The compact form (the default) is optax's own composition around :func:`scale_by_ftml`, in the
    order that gives :func:`ftmlopt.rule.compact_step`'s step (MXNet 1.9's order of options):

    .. code-block:: python

        optax.chain(
            optax.add_decayed_weights(weight_decay, mask),  # coupled L2 (feeds v): g + wd w
            optax.clip(clip_gradient),                      # element-wise, after the L2
            scale_by_ftml(b1, b2, eps, state_dtype=...),
            optax.add_decayed_weights(weight_decay, mask),  # decoupled_weight_decay=True instead
            optax.scale_by_learning_rate(learning_rate),
        )

    (pieces that are off are left out), that is

    .. math::

        \text{update} = -\eta_t \Big( \frac{1-\beta_1}{1-\beta_1^t}\,
            \frac{g'}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon} + \lambda_d w_{t-1} \Big),
        \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g'^2

    with :math:`g' = \mathrm{clip}(g + \lambda_c w_{t-1}, c)`. In exact arithmetic this is the rule's
    ``w (1 - lr wd) - step``; in floating point the chain multiplies by ``lr`` last where the rule
    folds it into the step size (``lr (1-b1)/(1-b1^t)``) and applies the decay as a factor, so the
    weights agree with :func:`ftml_direct` (the rule itself) to a few ulps per step, and bit for
    bit when ``lr`` is a power of two and no decoupled decay is used (tested).

    ``update(grads, state)`` needs ``params`` only when a weight decay is on (``ValueError``
    naming it otherwise), as optax's ``add_decayed_weights`` does. ``compact=False`` is MXNet's
    three-state form (state :class:`FTMLState`, ``d, v, z``), unchanged: it always needs
    ``params`` and takes no ``mask``. Extra keyword arguments to ``update`` are ignored.

    Works under :func:`jax.jit`, with :func:`optax.chain`, :func:`optax.inject_hyperparams` (give
    it ``hyperparam_dtype=jnp.float32`` for a model whose parameters are all half precision; an
    injected ``weight_decay`` or ``clip_gradient`` is always on), :class:`optax.MultiSteps`,
    :func:`optax.multi_transform`, any pytree of float16/bfloat16/float32/float64 leaves, and
    sharded parameters.

    Args:
        learning_rate: :math:`\eta` >= 0 (0: no step, ``v`` and the count still move) or an optax
            schedule ``count -> lr`` (evaluated at the count before the step).
        b1: :math:`\beta_1` in [0, 1).
        b2: :math:`\beta_2` in [0, 1).
        eps: :math:`\epsilon` >= 0, added *outside* the square root (MXNet's convention).
        weight_decay: :math:`\lambda` >= 0, or None (the default) for none. Coupled L2 added to
            the gradient before clipping (MXNet 1.9's ``wd``) unless ``decoupled_weight_decay``.
            None rather than 0.0 by default so that :func:`optax.inject_hyperparams` leaves it out
            (it injects every numeric default, and an injected decay is always on, needing params);
            0.0 is off too.
        clip_gradient: None (off) or a finite bound > 0 for element-wise clipping of :math:`g'`.
        compact: True (default): the compact form above. False: MXNet's three-state form.
        decoupled_weight_decay: apply ``weight_decay`` AdamW's way, ``-lr wd w`` added to the
            update (``w <- w (1 - lr wd)`` before the step, as ``ftmlopt.torch.FTML`` does).
        mask: optax's weight-decay mask (a tree of bools like the parameters, or a callable
            ``params -> tree``): the decay applies where it is True, as in :func:`optax.adamw`.
            Compact form only.
        state_dtype: dtype of the state; None: the parameter's dtype, float32 for half types.
        state_bits: None or 32 (float ``v``, the default), 8 or 4: low-bit ``v`` for leaves of at least
            4096 elements (:func:`scale_by_ftml`; compact form only, ``ValueError`` with ``compact=False``).

    Returns:
        An ``optax.GradientTransformationExtraArgs``; its state is :class:`FTMLChainState` (with
        ``.count`` and ``.v``) or, for ``compact=False``, :class:`FTMLState`.

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
        ...     updates, state = tx.update(jax.grad(loss)(params), state)
        ...     params = optax.apply_updates(params, updates)
        >>> bool(loss(params) < 1e-2), int(state.count)
        (True, 50)

        Decoupled weight decay on the kernels only (optax's ``mask``), with the weights passed:

        >>> tx = ftml(0.1, weight_decay=0.01, decoupled_weight_decay=True, mask={"w": True, "b": False})
        >>> params = {"w": jnp.ones(2), "b": jnp.ones(2)}
        >>> updates, _ = tx.update({"w": jnp.zeros(2), "b": jnp.zeros(2)}, tx.init(params), params)
        >>> updates["w"], updates["b"]
        (Array([-0.001, -0.001], dtype=float32), Array([0., 0.], dtype=float32))

    References:
        S. Zheng and J. T. Kwok, "Follow the Moving Leader in Deep Learning", ICML 2017.
    """
    if weight_decay is None:
        weight_decay = 0.0
    bits = _check_state_bits(state_bits, compact)
    if not compact and mask is not None:
        raise ValueError(
            "Invalid mask: ftml(compact=False) (MXNet's form) has no weight-decay mask; use the compact form"
        )
    if compact is True:
        _validate(learning_rate, b1, b2, eps, weight_decay, clip_gradient, compact, decoupled_weight_decay, state_dtype)
        return _compact_chain(
            learning_rate, b1, b2, eps, weight_decay, clip_gradient, bool(decoupled_weight_decay), mask, state_dtype,
            bits,
        )
    init, run = _make(
        learning_rate, b1, b2, eps, weight_decay, clip_gradient, compact, decoupled_weight_decay, state_dtype
    )

    def update(
        updates: optax.Updates, state: State, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, State]:
        del extra_args
        return run(updates, state, params, want_params=False)

    return optax.GradientTransformationExtraArgs(init, update)


def _compact_chain(
    learning_rate: ScalarOrSchedule,
    b1: Any,
    b2: Any,
    eps: Any,
    weight_decay: Any,
    clip_gradient: Any,
    decoupled: bool,
    mask: Any,
    state_dtype: Any,
    state_bits: int = 32,
) -> optax.GradientTransformationExtraArgs:
    """The compact form of :func:`ftml` as an optax chain (arguments already validated)."""
    weight_decay = _hyper(weight_decay)
    decay = _is_on(weight_decay)
    pieces: list[optax.GradientTransformation] = []
    if decay and not decoupled:
        pieces.append(_needs_params(optax.add_decayed_weights(weight_decay, mask), f"weight_decay={weight_decay!r}"))
    if clip_gradient is not None:
        pieces.append(optax.clip(_hyper(clip_gradient)))
    pieces.append(scale_by_ftml(b1, b2, eps, state_dtype=state_dtype, state_bits=state_bits))
    if decay and decoupled:
        pieces.append(
            _needs_params(
                optax.add_decayed_weights(weight_decay, mask),
                f"weight_decay={weight_decay!r}, decoupled_weight_decay=True",
            )
        )
    pieces.append(optax.scale_by_learning_rate(_hyper(learning_rate) if not callable(learning_rate) else learning_rate))
    chain = optax.chain(*pieces)

    def init(params: optax.Params) -> FTMLChainState:
        return FTMLChainState(inner=tuple(chain.init(params)))

    def update(
        updates: optax.Updates, state: FTMLChainState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, FTMLChainState]:
        del extra_args
        if isinstance(state, FTMLCompactState):
            raise TypeError(
                "state is an FTMLCompactState (ftml's state before it became an optax chain, or "
                "ftml_direct's): convert it with ftmlopt.optax.from_compact_state(tx.init(params), state)"
            )
        if not isinstance(state, FTMLChainState):
            raise TypeError(
                f"state must be the FTMLChainState made by this transformation's init (compact=True), "
                f"got {type(state).__name__}"
            )
        updates, inner = chain.update(updates, state.inner, params)
        return updates, FTMLChainState(inner=tuple(inner))

    return optax.GradientTransformationExtraArgs(init, update)
