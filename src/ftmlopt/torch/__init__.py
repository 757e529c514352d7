"""PyTorch front end: :class:`FTML`, a ``torch.optim.Optimizer``.

One job per module (the layout of ``torch/optim``):

* :mod:`ftmlopt.torch.ftml`: the :class:`FTML` class;
* :mod:`ftmlopt.torch.functional`: the functional step :func:`ftmlopt.torch.functional.ftml`, which
  dispatches to :mod:`~ftmlopt.torch._single_tensor` (the for-loop, the ground truth),
  :mod:`~ftmlopt.torch._multi_tensor` (``torch._foreach_*``) or :mod:`~ftmlopt.torch._fused`
  (the fused kernels). The function is not re-exported here, so that ``ftmlopt.torch.ftml`` names
  the module;
* :mod:`~ftmlopt.torch._validation` (checks), :mod:`~ftmlopt.torch._checkpoint` (``state_dict``
  checks and conversion between forms), :mod:`~ftmlopt.torch._dtypes` (the rule's dtype policy in
  torch dtypes), :mod:`~ftmlopt.torch._constants` (a step's constants from :mod:`ftmlopt.rule`).

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
