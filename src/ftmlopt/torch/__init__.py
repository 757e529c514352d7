"""PyTorch front end: :class:`FTML`, a ``torch.optim.Optimizer``.

The functional step is :func:`ftmlopt.torch.functional.ftml`; the implementations live in
:mod:`ftmlopt.torch.ftml` (the function is not re-exported here, so that ``ftmlopt.torch.ftml``
names that module).

Importing this module imports torch (``import ftmlopt`` alone does not).

Example:
    >>> import torch
    >>> from ftmlopt.torch import FTML
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = FTML(model.parameters(), lr=2.5e-3, betas=(0.6, 0.999), weight_decay=1e-4)
    >>> model(torch.ones(2, 3)).sum().backward()
    >>> opt.step()
    >>> sorted(opt.state[model.weight])  # the compact form: half of Adam's state
    ['step', 'v']
    >>> mxnet = FTML(model.parameters(), compact=False)  # MXNet 1.9's three-state form
    >>> model(torch.ones(2, 3)).sum().backward()
    >>> mxnet.step()
    >>> sorted(mxnet.state[model.weight])
    ['d', 'step', 'v', 'z']
"""

from ftmlopt.torch.ftml import FTML

__all__ = ["FTML"]
