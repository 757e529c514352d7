"""Hypothesis strategies of bad hyper-parameter values, shared by the fuzz tests of every front end.

Each strategy yields values that the named kind of argument must reject with ``TypeError`` or
``ValueError``: wrong types (strings, None, containers, complex, bool), NaN and infinities, and
out-of-range numbers.
"""

from __future__ import annotations

import math

from hypothesis import strategies as st

NAN, INF = math.nan, math.inf

wrong_type = st.sampled_from(["0.1", None, [0.1], (0.1,), {"x": 0.1}, 1j, b"1", object()])
#: Not a real number at all, or a bool (bools are rejected where a float is expected).
not_real = wrong_type | st.just(True)
non_finite = st.sampled_from([NAN, INF, -INF])

#: Must be finite and > 0 (learning rates).
bad_positive = not_real | non_finite | st.floats(max_value=0.0, allow_nan=False, allow_infinity=False)
#: Must be finite and >= 0 (learning rates where 0 means "no step": the torch front end, like torch.optim).
bad_learning_rate = not_real | non_finite | st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False)
#: Must be in [0, 1) (betas).
bad_unit = (
    not_real
    | non_finite
    | st.floats(min_value=1.0, allow_nan=False, allow_infinity=False)
    | st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False)
)
#: Must be finite and >= 0 (epsilon, weight decay, rescale_grad).
bad_nonnegative = not_real | non_finite | st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False)
#: Must be finite (any sign).
bad_finite = not_real | non_finite
#: Step counts: ints >= 1.
bad_step = st.sampled_from([0, -1, 1.0, 1.5, True, "1", None, NAN]) | st.integers(max_value=0)
#: Flags: exactly True or False.
bad_flag = st.sampled_from([0, 1, "True", None, 1.0, [True]])
