"""The CuPy adapter: device and stream handling (needs an NVIDIA GPU)."""

from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (it needs an NVIDIA GPU)")
if not cupy.cuda.is_available():
    pytest.skip("CuPy needs a CUDA GPU; none is visible here", allow_module_level=True)

from favorcore_backends import cupy as fcupy

import favorcore as fc

FMAP = fc.PositiveFeatures(m=64, seed=0)


@pytest.mark.parametrize("causal", [False, True])
def test_runs_on_the_inputs_device_and_stream(causal: bool) -> None:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 300, 16)).astype(np.float32) / 2 for _ in range(3))
    want = fc.favor_attention(q, k, v, features=FMAP, causal=causal)
    last = cupy.cuda.runtime.getDeviceCount() - 1
    with cupy.cuda.Device(last):
        qd, kd, vd = (cupy.asarray(a) for a in (q, k, v))
    stream = cupy.cuda.Stream(non_blocking=True)
    with cupy.cuda.Device(0):
        out = fcupy.favor_attention(qd, kd, vd, features=FMAP, causal=causal, stream=stream)
    stream.synchronize()
    assert out.device.id == last
    np.testing.assert_allclose(cupy.asnumpy(out), want, rtol=1e-4, atol=1e-5)
    exact = fcupy.softmax_attention(qd, kd, vd, causal=causal)
    np.testing.assert_allclose(
        cupy.asnumpy(exact), fc.softmax_attention(q, k, v, causal=causal), rtol=1e-4, atol=1e-5
    )


def test_rejects_host_arrays() -> None:
    x = np.ones((3, 4))
    with pytest.raises(TypeError, match=r"q must be a cupy\.ndarray"):
        fcupy.favor_attention(x, x, x, features=FMAP)
