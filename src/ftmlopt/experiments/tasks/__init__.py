"""One module per task of ``ftmlopt reproduce``; each exposes ``SPEC``, a
:class:`~ftmlopt.experiments.harness.TaskSpec`.

``timeseries`` (§4.6), ``mnist`` (§4.1a), ``babi`` (§4.3), ``charlm`` (stands in for §4.4), ``dqn`` (§4.5,
DQN on CartPole), ``transformer`` (a char-level GPT: not in the paper). The modules
import torch lazily (inside the runs), so listing the tasks needs only NumPy.
"""

from __future__ import annotations

import importlib
from typing import Any

TASKS: tuple[str, ...] = ("timeseries", "mnist", "babi", "charlm", "transformer", "dqn")

#: tasks run by the supervised-training harness (:func:`get_spec`); ``dqn`` has its own loop
HARNESS_TASKS: tuple[str, ...] = tuple(t for t in TASKS if t != "dqn")


def get_spec(name: str) -> Any:
    """Return the ``SPEC`` of task ``name`` (one of :data:`HARNESS_TASKS`).

    Example:
        >>> from ftmlopt.experiments.tasks import get_spec
        >>> get_spec("timeseries").variants
        ('changing', 'stationary')
    """
    if name not in HARNESS_TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(HARNESS_TASKS)}")
    return importlib.import_module(f"ftmlopt.experiments.tasks.{name}").SPEC
