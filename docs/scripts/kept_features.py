"""A training step with its features kept for the backward against recomputed, on PyTorch.

Usage: ``python docs/scripts/kept_features.py [--length 8192] [--heads 8] [--packed]
[--repeats 9] [--threads 2]``. Times one forward and backward of ``out.sum()`` (float32,
d = 64, m = 256; FAVOR+ without the balance, or with ``--packed`` the protein model's
attention call: FAVOR++ with the balance on documents of protein-like lengths), with
:func:`favorcore_backends.torch.kept_features` at 128 MiB and at 0, alternating in one
process, and the forward alone; prints the medians and the median of the step ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def main() -> None:
    import numpy as np
    import torch
    from favorcore_backends.torch import kept_features

    import favorcore as fc

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--packed", action="store_true")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    kw: dict[str, Any] = {"balance": False}
    fmap: fc.FeatureMap = fc.PositiveFeatures(m=256, seed=0)
    if a.packed:
        rng = np.random.default_rng(0)
        lengths: list[int] = []
        while sum(lengths) < a.length:  # protein-like lengths, as protein_step.py
            lengths.append(int(rng.gamma(2.0, 160.0)) + 30)
        ids = np.repeat(np.arange(len(lengths)), lengths)[: a.length]
        kw = {"segment_ids": torch.tensor(ids)[None, None], "check_finite": False}
        fmap = fc.OptimalPositiveFeatures(m=256, seed=0)
    q, k, v = (
        (torch.randn(1, a.heads, a.length, 64, generator=g) * 0.4).requires_grad_()
        for _ in range(3)
    )

    def step() -> None:
        for t in (q, k, v):
            t.grad = None
        out = fc.favor_attention(q, k, v, features=fmap, **kw)
        assert isinstance(out, torch.Tensor)
        out.sum().backward()  # type: ignore[no-untyped-call]

    def forward() -> None:
        with torch.no_grad():
            fc.favor_attention(q, k, v, features=fmap, **kw)

    times: dict[str, list[float]] = {"kept": [], "recomputed": [], "forward": []}
    for r in range(a.repeats + 1):  # the first round warms up
        for name in ("kept", "recomputed") if r % 2 else ("recomputed", "kept"):
            with kept_features(128 if name == "kept" else 0):
                t0 = time.perf_counter()
                step()
                took = time.perf_counter() - t0
            if r:
                times[name].append(took)
        t0 = time.perf_counter()
        forward()
        if r:
            times["forward"].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = statistics.median(
        b / c for b, c in zip(times["recomputed"], times["kept"], strict=True)
    )
    print(f"L = {a.length}, {a.heads} heads{', packed' if a.packed else ''}: step with features "
          f"kept {1e3 * med['kept']:.0f} ms, recomputed {1e3 * med['recomputed']:.0f} ms "
          f"(recomputed / kept {ratio:.3f}); forward {1e3 * med['forward']:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
