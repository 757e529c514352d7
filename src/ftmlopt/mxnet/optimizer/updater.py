"""``Updater`` and ``get_updater``: MXNet 1.9's key-value updater over NumPy arrays.

``updater(index, grad, weight)`` (note the order: gradient before weight) creates each key's
state lazily with ``create_state_multi_precision`` and calls ``update_multi_precision``.
``index`` may be one key or a list of keys with matching lists of gradients and weights.

Saving and loading never use pickle: :meth:`Updater.get_states` writes the versioned archive
of :mod:`ftmlopt.mxnet.optimizer.serialization`, which always carries the update counts so that a
resumed run continues with the same ``t`` (MXNet 1.9 restarts ``t`` unless the optimizer is
dumped too, which breaks FTML's bias correction).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ftmlopt.mxnet.optimizer import serialization as ser
from ftmlopt.mxnet.optimizer.base import Index, Optimizer

__all__ = ["Updater", "get_updater"]


class Updater:
    """Apply an :class:`~ftmlopt.mxnet.optimizer.Optimizer` to keyed weights, holding their states.

    Example:
        >>> import numpy as np
        >>> from ftmlopt.mxnet.optimizer import FTML, get_updater
        >>> updater = get_updater(FTML(learning_rate=0.1))
        >>> w = np.ones(3, dtype=np.float32)
        >>> updater(0, np.full(3, 0.5, dtype=np.float32), w)   # grad, then weight
        >>> w.round(4)
        array([0.9, 0.9, 0.9], dtype=float32)
        >>> blob = updater.get_states()          # bytes, no pickle
        >>> fresh = get_updater(FTML(learning_rate=0.1)); fresh.set_states(blob)
        >>> fresh.optimizer._index_update_count  # t continues from 1
        {0: 1}
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be an ftmlopt.mxnet.optimizer.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.states: dict[Index, Any] = {}
        self.states_synced: dict[Index, bool] = {}
        # FTML never aggregates (aggregate_num is 0), exactly as in MXNet 1.9.
        self.aggregate_updates = optimizer.aggregate_num > 0

    def __call__(
        self,
        index: Index | Sequence[Index],
        grad: np.ndarray | Sequence[np.ndarray],
        weight: np.ndarray | Sequence[np.ndarray],
    ) -> None:
        """Update ``weight`` (in place) from ``grad`` for key ``index`` (or lists of each)."""
        if isinstance(index, list | tuple):
            if not isinstance(grad, list | tuple) or not isinstance(weight, list | tuple):
                raise TypeError("with a list of indices, grad and weight must be lists too")
            if not len(index) == len(grad) == len(weight):
                raise ValueError(
                    f"index, grad and weight must have the same length, got {len(index)}, {len(grad)}, {len(weight)}"
                )
            indices, grads, weights = list(index), list(grad), list(weight)
        else:
            indices, grads, weights = [index], [grad], [weight]
        indices = [i.decode() if isinstance(i, bytes) else i for i in indices]

        # Validate everything (creating new states on the side) before mutating anything.
        opt = self.optimizer
        pending: dict[Index, Any] = {}
        for idx, g, w in zip(indices, grads, weights):
            if idx not in self.states and idx not in pending:
                pending[idx] = opt.create_state_multi_precision(idx, w)
            state = pending[idx] if idx in pending else self.states[idx]
            opt.check_update_multi_precision_args(idx, w, g, state)

        opt._set_current_context(0)  # NumPy arrays all live on the host: device 0
        for idx, state in pending.items():
            self.states[idx] = state
            self.states_synced[idx] = True
        for idx in indices:
            if not self.states_synced.get(idx, True):
                self.states[idx] = self.sync_state_context(self.states[idx], None)
                self.states_synced[idx] = True
        for idx, g, w in zip(indices, grads, weights):
            opt.update_multi_precision(idx, w, g, self.states[idx])

    def sync_state_context(self, state: Any, context: Any) -> Any:
        """Move a state to a device; NumPy has one device, so only the structure is rebuilt."""
        if isinstance(state, tuple | list):
            return type(state)(self.sync_state_context(s, context) for s in state)
        return state

    def get_states(self, dump_optimizer: bool = False) -> bytes:
        """Serialise the states (and the update counts; with ``dump_optimizer`` the optimizer too).

        Raises:
            TypeError: something cannot be stored as data (e.g. a lambda ``lr_scheduler`` with
                ``dump_optimizer=True``).
        """
        opt = self.optimizer
        counts = {
            "devices": {dev: dict(c) for dev, c in opt._all_index_update_counts.items()},
            "num_update": opt.num_update,
        }
        encoded_opt = _encode_optimizer(opt) if dump_optimizer else None
        return ser.dumps(self.states, counts, encoded_opt)

    def set_states(self, states: bytes) -> None:
        """Load a blob from :meth:`get_states`; on any error the updater is left untouched.

        The update counts are restored, so FTML's ``t`` continues where it stopped. A blob made with
        ``dump_optimizer=True`` also replaces the optimizer (``param_dict`` is not stored: re-attach
        it, as Gluon's Trainer does).
        """
        new_states, counts, encoded_opt = ser.loads(states)
        devices = counts.get("devices")
        num_update = counts.get("num_update")
        if not isinstance(devices, dict) or isinstance(num_update, bool) or not isinstance(num_update, int):
            raise ser.StateFormatError("states archive has malformed update counts")
        for dev, c in devices.items():
            if not isinstance(c, dict) or not all(isinstance(n, int) and n >= 0 for n in c.values()):
                raise ser.StateFormatError(f"malformed update counts for device {dev!r}")
        new_opt = _decode_optimizer(encoded_opt) if encoded_opt is not None else None

        # Commit.
        if new_opt is not None:
            self.optimizer = new_opt
        else:
            opt = self.optimizer
            # The states are replaced wholesale, so are the counts: a key absent from the blob gets a
            # fresh state on its next update and must restart at t = begin_num_update + 1.
            opt._all_index_update_counts.clear()
            opt._all_index_update_counts.update({dev: dict(c) for dev, c in devices.items()})
            opt._all_index_update_counts.setdefault(0, {})
            opt._index_update_count = opt._all_index_update_counts.setdefault(opt._current_device, {})
            opt.num_update = num_update
        self.states = new_states
        self.states_synced = dict.fromkeys(new_states, False)


def get_updater(optimizer: Optimizer) -> Updater:
    """Return an :class:`Updater` for ``optimizer`` (MXNet's ``mx.optimizer.get_updater``)."""
    return Updater(optimizer)


def _encode_optimizer(opt: Optimizer) -> dict[str, Any]:
    name = type(opt).__name__.lower()
    if Optimizer.opt_registry.get(name) is not type(opt):
        raise TypeError(
            f"cannot dump optimizer of class {type(opt).__qualname__}: it is not registered "
            "(decorate it with ftmlopt.mxnet.optimizer.register)"
        )
    attrs = {k: v for k, v in vars(opt).items() if k not in ("param_dict", "_index_update_count")}
    return {"name": name, "attrs": ser.encode_value(attrs, f"optimizer {type(opt).__name__}")}


def _decode_optimizer(encoded: Any) -> Optimizer:
    if not isinstance(encoded, dict) or set(encoded) != {"name", "attrs"}:
        raise ser.StateFormatError("malformed optimizer record")
    cls = Optimizer.opt_registry.get(str(encoded["name"]))
    if cls is None:
        raise ser.StateFormatError(f"optimizer {encoded['name']!r} is not registered here")
    attrs = ser.decode_value(encoded["attrs"])
    if not isinstance(attrs, dict):
        raise ser.StateFormatError("optimizer attributes must be a dict")
    counts = attrs.get("_all_index_update_counts")
    device = attrs.get("_current_device", 0)
    if not isinstance(counts, dict) or device not in counts:
        raise ser.StateFormatError("optimizer record has no valid update counts")
    opt = cls.__new__(cls)
    opt.__dict__.update(attrs)
    opt.param_dict = {}
    opt._index_update_count = counts[device]
    return opt
