"""How far a compiled, fused FAVOR+ kernel gets on this machine: a numba prototype.

Not part of favorcore (numba is not one of its dependencies). Run it in an environment with
``numba``, ``scipy`` (numba's BLAS), ``threadpoolctl`` and favorcore::

    python -m venv /tmp/nb && /tmp/nb/bin/pip install numba scipy threadpoolctl .
    /tmp/nb/bin/python docs/scripts/fused_prototype.py [--tile 512] [--no-exp]

Bidirectional FAVOR+ at L = 16384, 8 heads, d = 64, m = 256, float32, one head per call of a
``nogil`` kernel, two Python threads, one BLAS thread each. A tile of rows at a time: the
keys' augmented input and its projection, a vectorised polynomial ``exp`` (Cephes' ``expf``:
numba's own ``exp`` is a scalar libm call here, and PyPI's llvmlite has no SVML) with the
features below the normal range set to 0, ``kv += kfᵀ V`` and the key sums; then the queries'
projection, their row max, ``exp``, ``qf kv`` and the division, straight into the output.
No Python between tiles, no GIL: the costs the NumPy engine pays per block are gone. The
output is checked against float64. ``--no-exp`` skips both ``exp`` passes (the result is then
wrong; only the time counts): what the products, copies and sums alone cost.

Measured here (session 7; the favorcore NumPy engine timed alternately in the same process;
GEMM 331-346 GFLOP/s, 4096^3 as the benchmark measures it):

* tile 512 (this script's defaults): prototype 111-117 ms (43-45 % of GEMM), favorcore
  136-154 ms (33-37 %), in four runs; the output 7e-8 from float64;
* tile 128 / 256 / 1024 / 2048: 130 / 120-123 / 119 / 123 ms;
* ``--no-exp``, tile 512: 101-103 ms, 49.6-50.4 % of GEMM (two runs).

So even without any ``exp`` the four products with BLAS on these shapes (``K = d + 2``, or
``N = d`` columns) and the passes that feed them only just reach 50 % of the 4096^3 GEMM:
target 1 of the performance issue is at the ceiling of the GEMM shapes themselves.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

import numba as nb
import numpy as np
from favorcore_backends.bench import _gemm_rate
from threadpoolctl import threadpool_limits

import favorcore as fc

LOG2E = np.float32(1.4426950408889634)
C1, C2 = np.float32(0.693359375), np.float32(-2.12194440e-4)
FLOOR = np.float32(-87.33)  # exp below it is not a normal float32


@nb.njit(nogil=True, fastmath=True, cache=True)
def _exp_rows(a: Any, ib: Any, shift: Any, skip: bool) -> None:
    """``a[i, j] = exp(a[i, j] - shift[i])`` in place (0 below the normal range): Cephes'
    polynomial, then the power of two from its exponent bits (``ib``: int32 scratch)."""
    if skip:
        return
    rows, m = a.shape
    for i in range(rows):
        s = shift[i]
        for j in range(m):
            x = a[i, j] - s
            keep = x >= FLOOR
            x = max(x, FLOOR)
            n = np.floor(x * LOG2E + np.float32(0.5))
            r = x - n * C1 - n * C2
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            p = p * r * r + r + np.float32(1.0)
            a[i, j] = p if keep else np.float32(0.0)
            ib[i, j] = (np.int32(n) + np.int32(127)) << 23
    scale = ib.view(np.float32)
    for i in range(rows):
        for j in range(m):
            a[i, j] *= scale[i, j]


@nb.njit(nogil=True, fastmath=True, cache=True)
def favor_bidirectional(x: Any, y: Any, v: Any, wq: Any, wk: Any, c: Any, out: Any,
                        tile: int, skip_exp: bool) -> None:  # fmt: skip
    """One head: ``x``, ``y`` ``(L, d)``, ``v`` ``(L, dv)``, ``wq = [W; 0]`` ``(d + 1, m)``,
    ``wk = [W; 1; -log sqrt m]`` ``(d + 2, m)`` (``W`` scaled), ``c = scale / 2``."""
    length, d = y.shape
    m, dv = wk.shape[1], v.shape[1]
    aug = np.empty((tile, d + 2), np.float32)
    feats = np.empty((tile, m), np.float32)
    ib = np.empty((tile, m), np.int32)
    zero = np.zeros(tile, np.float32)
    kv = np.zeros((m, dv), np.float32)
    ks = np.zeros(m, np.float32)
    o = np.empty((tile, dv), np.float32)
    for s in range(0, length, tile):
        t = min(tile, length - s)
        for i in range(t):
            sq = np.float32(0.0)
            for j in range(d):
                aug[i, j] = y[s + i, j]
                sq += y[s + i, j] * y[s + i, j]
            aug[i, d] = -c * sq
            aug[i, d + 1] = 1.0
        f = feats[:t]
        np.dot(aug[:t], wk, f)
        _exp_rows(f, ib[:t], zero, skip_exp)
        kv += np.dot(f.T, v[s : s + t])
        for i in range(t):
            for j in range(m):
                ks[j] += f[i, j]
    wqd = np.ascontiguousarray(wq[:d])
    for s in range(0, length, tile):
        t = min(tile, length - s)
        f = feats[:t]
        np.dot(x[s : s + t], wqd, f)
        top = np.empty(t, np.float32)
        for i in range(t):
            best = np.float32(-np.inf)
            for j in range(m):
                f[i, j] += wq[d, j]
                best = max(best, f[i, j])
            top[i] = best
        _exp_rows(f, ib[:t], top, skip_exp)
        ot = o[:t]
        np.dot(f, kv, ot)
        for i in range(t):
            den = np.float32(0.0)
            for j in range(m):
                den += f[i, j] * ks[j]
            r = np.float32(1.0) / den
            for j in range(dv):
                out[s + i, j] = ot[i, j] * r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--no-exp", action="store_true")
    parser.add_argument("--length", type=int, default=16384)
    args = parser.parse_args()
    length, heads, d, m = args.length, 8, 64, 256
    rng = np.random.default_rng(0)
    q, k, v = (0.5 * rng.standard_normal((heads, length, d), dtype=np.float32) for _ in range(3))
    w = rng.standard_normal((m, d)).astype(np.float32) * np.float32(d**-0.25)
    wq = np.concatenate([w.T, np.zeros((1, m), np.float32)])
    wk = np.concatenate([w.T, np.ones((1, m), np.float32),
                         np.full((1, m), -0.5 * np.log(m), np.float32)])  # fmt: skip
    c = np.float32(0.5 * d**-0.5)
    out = np.empty_like(v)

    def head(h: int) -> None:
        favor_bidirectional(q[h], k[h], v[h], wq, wk, c, out[h], args.tile, args.no_exp)

    def prototype() -> None:
        with threadpool_limits(1):
            workers = [threading.Thread(target=lambda r=r: [head(h) for h in r])
                       for r in (range(0, heads, 2), range(1, heads, 2))]  # fmt: skip
            for t in workers:
                t.start()
            for t in workers:
                t.join()

    prototype()
    if not args.no_exp:  # against float64, head 0 (the features' 1/sqrt(m) cancels)
        x, y, vv = (a[0].astype(np.float64) for a in (q, k, v))
        w64 = w.T.astype(np.float64)
        qf = np.exp(x @ w64)
        kf = np.exp(y @ w64 - 0.5 * (y * y).sum(1, keepdims=True) * d**-0.5)
        want = (qf @ (kf.T @ vv)) / (qf @ kf.sum(0))[:, None]
        print(f"max |prototype - float64| = {np.abs(out[0] - want).max():.1e}")
    features = fc.PositiveFeatures(m=m, seed=1)

    def engine() -> None:
        fc.favor_attention(q[None], k[None], v[None], features=features, balance=False)

    engine()
    times: dict[str, list[float]] = {"prototype": [], "favorcore": []}
    for _ in range(5):
        for name, fn in (("prototype", prototype), ("favorcore", engine)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    gemm = _gemm_rate("numpy")
    flop = 8 * length * m * d * heads
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:10s} {t * 1e3:7.1f} ms  {flop / t / 1e9 / gemm:6.1%} of GEMM ({gemm:.0f})")


if __name__ == "__main__":
    main()
