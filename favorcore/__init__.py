"""favorcore: FAVOR attention (Performer random features) for every array framework.

The core is written once against the Python Array API standard and runs on any namespace
that array-api-compat supports: NumPy, CuPy, PyTorch, JAX, Dask and array-api-strict.

>>> import numpy as np
>>> import favorcore as fc
>>> rng = np.random.default_rng(0)
>>> q, k, v = (rng.standard_normal((8, 512, 64)).astype(np.float32) for _ in range(3))
>>> out = fc.favor_attention(q, k, v, causal=True)
>>> out.shape, out.dtype
((8, 512, 64), dtype('float32'))
"""

from . import steps
from .attention import (
    DEFAULT_FEATURES,
    AttentionState,
    favor_attention,
    favor_attention_vjp,
    linear_attention,
    resolve,
    softmax_attention,
)
from .balance import BALANCE_KINDS, Balance, BalanceKind, apply_balance, balance_statistics
from .diagnostics import ErrorEstimate, estimate_error
from .features import (
    AccuracyWarning,
    FeatureMap,
    GeneralizedFeatures,
    OptimalPositiveFeatures,
    PositiveFeatures,
    TrigonometricFeatures,
    hyperbolic_features,
)
from .projection import draw_projection
from .steps import Steps, fast_paths, register_steps

__version__ = "0.1.0"

__all__ = [
    "BALANCE_KINDS",
    "DEFAULT_FEATURES",
    "AccuracyWarning",
    "AttentionState",
    "Balance",
    "BalanceKind",
    "ErrorEstimate",
    "FeatureMap",
    "GeneralizedFeatures",
    "OptimalPositiveFeatures",
    "PositiveFeatures",
    "Steps",
    "TrigonometricFeatures",
    "__version__",
    "apply_balance",
    "balance_statistics",
    "draw_projection",
    "estimate_error",
    "fast_paths",
    "favor_attention",
    "favor_attention_vjp",
    "hyperbolic_features",
    "linear_attention",
    "register_steps",
    "resolve",
    "softmax_attention",
    "steps",
]
