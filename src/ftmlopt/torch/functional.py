"""The functional FTML step, ``ftml(params, grads, ds, vs, zs, state_steps, *, lr, beta1, ...)``.

It works on lists of tensors in place, like ``torch.optim._functional``, in MXNet's three-state
form unless ``compact=True`` (this low-level function follows the state lists its caller hands
it); :class:`ftmlopt.torch.FTML` calls it once per param group. The implementation lives in
:mod:`ftmlopt.torch.ftml` (next to the for-loop, foreach and fused paths it dispatches to); this
module is its public address.

Example:
    >>> import torch
    >>> from ftmlopt.torch.functional import ftml
    >>> w, g = torch.tensor([1.0]), torch.tensor([2.0])
    >>> d, v, z, step = torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.tensor(0.0)
    >>> ftml([w], [g], [d], [v], [z], [step], lr=0.5, beta1=0.6, beta2=0.999, eps=0.0)
    >>> w, step
    (tensor([0.5000]), tensor(1.))

The compact form (the default of :class:`ftmlopt.torch.FTML`) takes empty ``ds`` and ``zs`` lists:

    >>> w, v, step = torch.tensor([1.0]), torch.zeros(1), torch.tensor(0.0)
    >>> ftml([w], [g], [], [v], [], [step], lr=0.5, beta1=0.6, beta2=0.999, eps=0.0, compact=True)
    >>> w, v
    (tensor([0.5000]), tensor([0.0040]))
"""

from ftmlopt.torch.ftml import ftml

__all__ = ["ftml"]
