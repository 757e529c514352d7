"""MXNet 1.9's ``Optimizer`` base class and registry, over NumPy arrays.

Semantics follow ``mxnet.optimizer.Optimizer`` 1.9.1 (the deliberate departures are listed under
"Differences from MXNet 1.9" in ``docs/mxnet-system.md``): learning-rate defaulting and scheduler override,
``lr_mult``/``wd_mult`` with the ``_weight``/``_gamma`` rule, per-device update counts,
multi-precision wrappers, and pickling without ``param_dict``.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np

from ftmlopt.mxnet.operator import check_clip_bound
from ftmlopt.rule import check_finite, check_grad_scale, check_lr

__all__ = ["Optimizer", "create", "register"]

Index = Any  # an int or a str key, as in MXNet
State = Any  # whatever create_state returns: an array, a tuple of arrays, None, ...

_O = TypeVar("_O", bound=type)

_FP16_WARNING = (
    "Accumulating with float16 in optimizer can lead to poor accuracy or slow convergence. "
    "Consider using multi_precision=True option of the optimizer"
)
_SET_LR_WITH_SCHEDULER = (
    "LRScheduler of the optimizer has already been defined. Note that set_learning_rate can mutate "
    "the value of the learning rate of the optimizer only when the LRScheduler of the optimizer is undefined."
)


class Optimizer:
    """Base class of the MXNet-style optimizers (``mxnet.optimizer.Optimizer`` 1.9).

    Args:
        rescale_grad: multiply every gradient by this (finite, >= 0).
        param_idx2name: ``{index: name}``; names not ending in ``_weight`` or ``_gamma`` get no
            weight decay by default (MXNet 1.x rule).
        wd: L2 weight decay coefficient.
        clip_gradient: element-wise gradient clipping bound; ``None`` or a falsy value means off.
        learning_rate: the learning rate; defaults to 0.01 when neither it nor a scheduler is given.
        lr_scheduler: an :class:`ftmlopt.mxnet.lr_scheduler.LRScheduler` or any callable
            ``f(num_update) -> lr``. When both it and ``learning_rate`` are given, the scheduler's
            ``base_lr`` is overwritten (and a message printed, as MXNet does).
        sym: anything with ``attr_dict()`` and ``list_arguments()`` (an MXNet Symbol, or a stand-in);
            its ``__lr_mult__``/``__wd_mult__`` attributes seed the multipliers.
        begin_num_update: the update count to start from.
        multi_precision: keep a float32 master copy for float16 weights.
        param_dict: ``{index: obj}`` where ``obj`` has ``lr_mult`` and ``wd_mult`` attributes (Gluon
            parameters); not copied, and dropped on pickling.

    Example:
        >>> from ftmlopt.mxnet.optimizer import Optimizer
        >>> opt = Optimizer.create_optimizer("ftml", learning_rate=0.1)
        >>> type(opt).__name__, opt.learning_rate
        ('FTML', 0.1)
    """

    opt_registry: ClassVar[dict[str, type[Optimizer]]] = {}

    def __init__(
        self,
        rescale_grad: float = 1.0,
        param_idx2name: Mapping[Index, str] | None = None,
        wd: float = 0.0,
        clip_gradient: float | None = None,
        learning_rate: float | None = None,
        lr_scheduler: Callable[[int], float] | None = None,
        sym: Any = None,
        begin_num_update: int = 0,
        multi_precision: bool = False,
        param_dict: dict[Index, Any] | None = None,
    ) -> None:
        # Validate everything before storing anything (and before touching the scheduler).
        check_grad_scale(rescale_grad, "rescale_grad")
        check_finite(wd, "wd")
        if clip_gradient is not None:
            check_clip_bound(clip_gradient, "clip_gradient")  # MXNet's rule: falsy or negative is off
        if learning_rate is not None:
            check_lr(learning_rate, "learning_rate", positive=True)
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise TypeError(f"lr_scheduler must be callable as lr_scheduler(num_update), got {lr_scheduler!r}")
        if lr_scheduler is not None and learning_rate is not None and not hasattr(lr_scheduler, "base_lr"):
            raise ValueError(
                f"learning_rate={learning_rate!r} cannot override lr_scheduler={lr_scheduler!r}, which has no "
                "base_lr attribute; pass only one of them"
            )
        begin_num_update = _as_int(begin_num_update, "begin_num_update")
        if begin_num_update < 0:
            raise ValueError(f"begin_num_update must be >= 0, got {begin_num_update!r}")
        if param_idx2name is None:
            param_idx2name = {}
        if not isinstance(param_idx2name, Mapping):
            raise TypeError(
                f"param_idx2name should be a dict of param indexes to names, got {type(param_idx2name).__name__}"
            )
        if sym is not None and not (hasattr(sym, "attr_dict") and hasattr(sym, "list_arguments")):
            raise TypeError(f"sym must provide attr_dict() and list_arguments(), got {type(sym).__name__}")

        self.rescale_grad = rescale_grad
        self.lr_scheduler = lr_scheduler
        if lr_scheduler is None and learning_rate is None:
            learning_rate = 0.01
        self.lr = learning_rate
        if lr_scheduler is not None and learning_rate is not None:
            if lr_scheduler.base_lr != learning_rate:  # type: ignore[attr-defined]
                # MXNet prints (not warns) this message; kept for fidelity.
                print(
                    UserWarning(
                        "learning rate from ``lr_scheduler`` has been overwritten by ``learning_rate`` in optimizer."
                    )
                )
                lr_scheduler.base_lr = learning_rate  # type: ignore[attr-defined]

        self.wd = wd
        self.lr_mult: dict[Index, float] = {}
        self.wd_mult: dict[Index, float] = {}
        self.begin_num_update = int(begin_num_update)
        self.num_update = int(begin_num_update)
        self._all_index_update_counts: dict[int, dict[Index, int]] = {0: {}}
        self._current_device = 0
        self._index_update_count = self._all_index_update_counts[0]
        self.clip_gradient = clip_gradient
        self.multi_precision = bool(multi_precision)
        self.aggregate_num = 0
        self.idx2name: dict[Index, str] = dict(param_idx2name)
        self.sym_info: tuple[Any, ...] = (sym.attr_dict(), sym.list_arguments()) if sym is not None else ()
        self.param_dict: dict[Index, Any] = param_dict if param_dict else {}
        self.set_lr_mult({})
        self.set_wd_mult({})

    # ------------------------------------------------------------------ registry
    @staticmethod
    def register(klass: _O) -> _O:
        """Register an optimizer class under ``klass.__name__.lower()`` (usable as a decorator).

        Re-registering a name replaces the entry with a ``UserWarning``, as MXNet does.
        """
        if not isinstance(klass, type):
            raise TypeError(f"register expects a class, got {klass!r}")
        name = klass.__name__.lower()
        old = Optimizer.opt_registry.get(name)
        if old is not None:
            warnings.warn(
                f"WARNING: New optimizer {klass.__module__}.{klass.__name__} is overriding "
                f"existing optimizer {old.__module__}.{old.__name__}",
                UserWarning,
                stacklevel=2,
            )
        Optimizer.opt_registry[name] = klass
        return klass

    @staticmethod
    def create_optimizer(name: str, **kwargs: Any) -> Optimizer:
        """Instantiate a registered optimizer by (case-insensitive) name.

        Raises:
            ValueError: ``Cannot find optimizer NAME`` for an unknown name.
        """
        if not isinstance(name, str):
            raise TypeError(f"optimizer name must be a str, got {name!r}")
        klass = Optimizer.opt_registry.get(name.lower())
        if klass is None:
            raise ValueError(f"Cannot find optimizer {name}")
        return klass(**kwargs)

    # ------------------------------------------------------------------ state
    def create_state(self, index: Index, weight: np.ndarray) -> State:
        """The auxiliary state for one weight (``None`` for a stateless optimizer)."""
        return None

    def create_state_multi_precision(self, index: Index, weight: np.ndarray) -> State:
        """Like :meth:`create_state`, with a float32 master copy for float16 weights.

        With ``multi_precision`` and a float16 weight the state is ``(master32, inner_state)``.
        A float16 weight without ``multi_precision`` gets MXNet's accuracy warning.
        """
        _check_weight(weight, "weight")
        if self.multi_precision and weight.dtype == np.float16:
            master = weight.astype(np.float32)
            return (master, self.create_state(index, master))
        if weight.dtype == np.float16 and not self.multi_precision:
            warnings.warn(_FP16_WARNING, UserWarning, stacklevel=2)
        return self.create_state(index, weight)

    def update(self, index: Index, weight: np.ndarray, grad: np.ndarray, state: State) -> None:
        """Update ``weight`` in place from ``grad``; subclasses implement it."""
        raise NotImplementedError

    def check_update_args(self, index: Index, weight: np.ndarray, grad: np.ndarray, state: State) -> None:
        """Raise if :meth:`update` would reject these arguments; mutates nothing.

        The base class checks the weight and gradient; subclasses extend it to their state.
        """
        _check_weight(weight, "weight")
        _check_weight(grad, "grad")
        if grad.shape != weight.shape:
            raise ValueError(f"grad has shape {grad.shape}, which does not match weight's shape {weight.shape}")

    def _is_mp(self, weight: np.ndarray) -> bool:
        return self.multi_precision and weight.dtype == np.float16

    def check_update_multi_precision_args(
        self, index: Index, weight: np.ndarray, grad: np.ndarray, state: State
    ) -> None:
        """:meth:`check_update_args` for :meth:`update_multi_precision`'s state layout."""
        _check_weight(weight, "weight")
        _check_weight(grad, "grad")
        if self._is_mp(weight):
            if not (isinstance(state, tuple | list) and len(state) == 2):
                raise ValueError("multi-precision state must be a (master_weight, state) pair")
            master = state[0]
            _check_weight(master, "master weight")
            if master.dtype != np.float32 or master.shape != weight.shape:
                raise ValueError(
                    f"master weight must be float32 of shape {weight.shape}, got {master.dtype} {master.shape}"
                )
            self.check_update_args(index, master, grad.astype(np.float32), state[1])
        else:
            self.check_update_args(index, weight, grad, state)

    def update_multi_precision(self, index: Index, weight: np.ndarray, grad: np.ndarray, state: State) -> None:
        """:meth:`update`, through the float32 master copy when there is one."""
        if self._is_mp(weight):
            self.check_update_multi_precision_args(index, weight, grad, state)
            master, inner = state
            self.update(index, master, grad.astype(np.float32), inner)
            np.copyto(weight, master, casting="same_kind")
        else:
            self.update(index, weight, grad, state)

    # ------------------------------------------------------------------ learning rate
    @property
    def learning_rate(self) -> float:
        """The current base rate, ``lr_scheduler(num_update)`` if there is a scheduler, else ``lr``.

        Built-in schedulers are stateful, so reading this can advance them (as in MXNet).
        """
        if self.lr_scheduler is not None:
            return self.lr_scheduler(self.num_update)
        return self.lr  # type: ignore[return-value]

    def set_learning_rate(self, lr: float) -> None:
        """Set the rate; raises ``UserWarning`` (as an exception, like MXNet) when a scheduler is set."""
        if self.lr_scheduler is not None:
            raise UserWarning(_SET_LR_WITH_SCHEDULER)
        check_lr(lr, "lr", positive=True)
        self.lr = lr

    def set_lr_scale(self, args_lrscale: Any) -> None:  # pragma: no cover - trivial
        """Deprecated in MXNet; always raises ``DeprecationWarning``. Use :meth:`set_lr_mult`."""
        raise DeprecationWarning

    def set_lr_mult(self, args_lr_mult: Mapping[Index, float]) -> None:
        """Replace the per-parameter learning-rate multipliers.

        Starts from ``{}``, adds the symbol's ``__lr_mult__`` attributes, then ``args_lr_mult``
        (keys are names or indices).
        """
        new = self._mults_from_sym("__lr_mult__", {}, args_lr_mult, "args_lr_mult")
        self.lr_mult = new

    def set_wd_mult(self, args_wd_mult: Mapping[Index, float]) -> None:
        """Replace the per-parameter weight-decay multipliers.

        Names in ``param_idx2name`` not ending in ``_weight`` or ``_gamma`` get 0 (MXNet 1.x
        rule), then the symbol's ``__wd_mult__`` attributes, then ``args_wd_mult``.
        """
        base = {n: 0.0 for n in self.idx2name.values() if not (n.endswith("_weight") or n.endswith("_gamma"))}
        self.wd_mult = self._mults_from_sym("__wd_mult__", base, args_wd_mult, "args_wd_mult")

    def _mults_from_sym(
        self, attr_key: str, base: dict[Index, float], extra: Mapping[Index, float], argname: str
    ) -> dict[Index, float]:
        if not isinstance(extra, Mapping):
            raise TypeError(f"{argname} must be a dict, got {type(extra).__name__}")
        for k, val in extra.items():
            check_finite(val, f"{argname}[{k!r}]")
        out = dict(base)
        if self.sym_info:
            attr, arg_names = self.sym_info
            for name in arg_names:
                if name in attr and attr_key in attr[name]:
                    out[name] = float(attr[name][attr_key])
        out.update(extra)
        return out

    # ------------------------------------------------------------------ counting
    def _set_current_context(self, device_id: int) -> None:
        """Select (creating if needed) the per-device update counts used for ``t``."""
        if device_id not in self._all_index_update_counts:
            self._all_index_update_counts[device_id] = {}
        self._current_device = device_id
        self._index_update_count = self._all_index_update_counts[device_id]

    def _update_count(self, index: Index | list[Index] | tuple[Index, ...]) -> None:
        """Increment the current device's count for each index; ``num_update`` is the max."""
        indices = index if isinstance(index, list | tuple) else [index]
        for idx in indices:
            if idx not in self._index_update_count:
                self._index_update_count[idx] = self.begin_num_update
            self._index_update_count[idx] += 1
            self.num_update = max(self._index_update_count[idx], self.num_update)

    def _get_lrs(self, indices: list[Index]) -> list[float]:
        lr = self.lr_scheduler(self.num_update) if self.lr_scheduler is not None else self.lr
        return [lr * self._mult(i, self.lr_mult, "lr_mult") for i in indices]  # type: ignore[operator]

    def _get_lr(self, index: Index) -> float:
        return self._get_lrs([index])[0]

    def _get_wds(self, indices: list[Index]) -> list[float]:
        return [self.wd * self._mult(i, self.wd_mult, "wd_mult") for i in indices]

    def _get_wd(self, index: Index) -> float:
        return self._get_wds([index])[0]

    def _mult(self, index: Index, mults: dict[Index, float], attr: str) -> float:
        # First matching rule wins: param_dict, then the index, then the index's name.
        if index in self.param_dict:
            mult: float = getattr(self.param_dict[index], attr)  # used as given, as MXNet does
            return mult
        if index in mults:
            return mults[index]
        if index in self.idx2name:
            return mults.get(self.idx2name[index], 1.0)
        return 1.0

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        ret = self.__dict__.copy()
        ret.pop("param_dict", None)
        return ret

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__ = state
        self.param_dict = {}


def _as_int(value: Any, name: str) -> int:
    """``value`` as an int; it must be an integer (a bool is not). Typed ``Any``: it is user input."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def _check_weight(arr: Any, name: str) -> None:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(arr).__name__}")
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")


def checked_rate(value: Any, name: str) -> float:
    """A scheduler- or multiplier-derived rate: finite and >= 0 (0 freezes the parameter)."""
    x = check_finite(value, name)
    if x < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return x


register = Optimizer.register
create = Optimizer.create_optimizer
