"""Deprecated location: the rule lives in :mod:`ftmlopt.rule`, the MXNet operator in :mod:`ftmlopt.mxnet.operator`."""
