"""Peak memory of causal FAVOR attention forward + backward in PyTorch (CPU).

Each configuration runs in a fresh subprocess; the figure is that process's peak
resident set (``ru_maxrss``) minus its resident set just before the call (PyTorch's
allocations are invisible to tracemalloc). Usage::

    python docs/scripts/torch_backward_memory.py [L ...]
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
import favorcore as fc
from favorcore_backends.torch import causal_favor_attention
L, segment = int(sys.argv[1]), None if sys.argv[2] == "none" else int(sys.argv[2])
torch.manual_seed(0)
q, k, v = (torch.randn(1, 1, L, 64, requires_grad=True) for _ in range(3))
fmap = fc.PositiveFeatures(m=256, seed=0)
causal_favor_attention(q[..., :256, :], k[..., :256, :], v[..., :256, :], features=fmap, segment=segment).sum().backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = causal_favor_attention(q, k, v, features=fmap, segment=segment)
out.square().sum().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"L": L, "segment": segment, "peak_mib": (peak - before) / 1024}))
"""


def measure(length: int, segment: int | None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(length), "none" if segment is None else str(segment)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    lengths = [int(a) for a in sys.argv[1:]] or [4096, 16384, 65536]
    print(f"{'L':>7} {'segment':>8} {'extra peak MiB':>15}")
    for length in lengths:
        for segment in (None, 2048):
            r = measure(length, segment)
            print(f"{r['L']:>7} {r['segment']!s:>8} {r['peak_mib']:>15.1f}")


if __name__ == "__main__":
    main()
