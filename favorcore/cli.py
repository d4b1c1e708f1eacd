"""Command line: ``favorcore demo`` (also ``python -m favorcore demo``), ``chunks``, ``bench``.

The demo runs on NumPy, the embedded default backend. For a few sequence lengths it
compares FAVOR+ attention with exact softmax attention, bidirectional and causal, and
prints the relative error and both run times in a table.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import numpy as np

from .attention import favor_attention, softmax_attention
from .balance import balance_statistics
from .features import OptimalPositiveFeatures, PositiveFeatures
from .steps import namespace_of

__all__ = ["main"]


class Progress:
    """A minimal text progress bar on a stream (stderr): ``label [#####.....] 5/10``."""

    def __init__(
        self, total: int, label: str, stream: TextIO = sys.stderr, width: int = 30
    ) -> None:
        self.total, self.label, self.stream, self.width, self.done = total, label, stream, width, 0
        self._draw()

    def advance(self, what: str = "") -> None:
        """Count one step done; ``what`` names the step now running."""
        self.done += 1
        self._draw(what)

    def _draw(self, what: str = "") -> None:
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if self.done >= self.total else ""
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {what:<28}{end}")
        self.stream.flush()


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def demo(
    lengths: Sequence[int],
    *,
    heads: int = 4,
    d: int = 64,
    m: int = 256,
    input_std: float = 0.5,
    repeats: int = 3,
    seed: int = 0,
    out: TextIO = sys.stdout,
) -> list[dict[str, Any]]:
    """Compare favorcore's default estimator with exact attention (NumPy float32).

    The estimator is FAVOR++ (``OptimalPositiveFeatures``) with the matrix balance: from
    each call's tokens when bidirectional, from a calibration draw (512 other tokens of
    the same distribution) when causal. Inputs are Gaussian, ``q, k ~ N(0, input_std^2)``
    per coordinate and ``v ~ N(0, 1)``, shaped ``(heads, L, d)``. The relative error is
    ``|out - exact|_F / |exact|_F`` and times are medians of ``repeats`` calls after one
    warm-up call.

    Returns the rows of the table as dictionaries.
    """
    rng = np.random.default_rng(seed)
    fmap = OptimalPositiveFeatures(m=m, seed=seed)
    warm = rng.standard_normal((1, 8, d)).astype(np.float32)
    favor_attention(warm, warm, warm, features=fmap)  # draws and caches the projection
    calib = [rng.standard_normal((heads, 512, d)).astype(np.float32) * input_std for _ in "qk"]
    stats = balance_statistics(*calib)  # causal attention: statistics fixed beforehand
    cases = [(n, causal) for n in lengths for causal in (False, True)]
    progress = Progress(2 * len(cases), "favorcore demo")
    rows: list[dict[str, Any]] = []
    for n, causal in cases:
        q, k = (rng.standard_normal((heads, n, d)).astype(np.float32) * input_std for _ in range(2))
        v = rng.standard_normal((heads, n, d)).astype(np.float32)
        mode = "causal" if causal else "bidirectional"
        progress._draw(f"L={n} {mode}: FAVOR")
        t_favor, approx = _median_time(
            functools.partial(
                favor_attention,
                q,
                k,
                v,
                features=fmap,
                causal=causal,
                balance=stats if causal else None,
            ),
            repeats,
        )
        progress.advance(f"L={n} {mode}: exact")
        t_exact, exact = _median_time(
            functools.partial(softmax_attention, q, k, v, causal=causal), repeats
        )
        progress.advance()
        err = float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))
        rows.append(
            {"L": n, "mode": mode, "rel_error": err, "favor_s": t_favor, "exact_s": t_exact}
        )
    print(
        f"\nFAVOR++ with the matrix balance (m={m}, orthogonal, seed={seed}; causal: calibrated "
        f"statistics) vs exact softmax attention, NumPy float32, "
        f"{heads} heads, d={d}, q,k ~ N(0, {input_std}^2)",
        file=out,
    )
    header = f"{'L':>7} {'mode':<14} {'rel. error':>10} {'FAVOR ms':>10} {'exact ms':>10} {'speed-up':>9}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        print(
            f"{r['L']:>7} {r['mode']:<14} {r['rel_error']:>10.4f} {1e3 * r['favor_s']:>10.1f} "
            f"{1e3 * r['exact_s']:>10.1f} {r['exact_s'] / r['favor_s']:>8.2f}x",
            file=out,
        )
    return rows


def chunks(
    length: int, sizes: Sequence[int], *, heads: int, d: int, m: int, repeats: int, out: TextIO
) -> None:
    """Time causal FAVOR+ for several chunk sizes (NumPy float32) and print a table."""
    rng = np.random.default_rng(0)
    fmap = PositiveFeatures(m=m, seed=0)
    q, k, v = (rng.standard_normal((heads, length, d)).astype(np.float32) * 0.5 for _ in range(3))
    favor_attention(q, k, v, features=fmap, causal=True)
    from .steps import steps_for

    default = steps_for(namespace_of(q)).chunk
    print(f"causal FAVOR+, NumPy float32, {heads} heads, L={length}, d={d}, m={m}", file=out)
    print(f"{'chunk':>7} {'median ms':>10}", file=out)
    for c in sizes:
        t, _ = _median_time(
            functools.partial(favor_attention, q, k, v, features=fmap, causal=True, chunk_size=c),
            repeats,
        )
        mark = "  (default)" if c == default else ""
        print(f"{c:>7} {1e3 * t:>10.1f}{mark}", file=out)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``favorcore`` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["bench"]:  # the benchmark has its own options
        from favorcore_backends.bench import main as bench_main

        return bench_main(args_list[1:])
    if args_list[:1] == ["protein"]:  # protein language models (favorcore[protein])
        from favorcore_backends.protein.cli import main as protein_main

        return protein_main(args_list[1:])
    parser = argparse.ArgumentParser(prog="favorcore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="side-by-side benchmark (see favorcore bench --help)")
    sub.add_parser("protein", help="train/evaluate protein LMs (see favorcore protein --help)")
    p_demo = sub.add_parser("demo", help="FAVOR+ vs exact attention: error and run time")
    p_demo.add_argument("--lengths", type=_positive_int, nargs="+", default=[512, 2048, 8192])
    p_demo.add_argument("--heads", type=_positive_int, default=4)
    p_demo.add_argument("--d", type=_positive_int, default=64)
    p_demo.add_argument("--m", type=_positive_int, default=256)
    p_demo.add_argument("--input-std", type=float, default=0.5)
    p_demo.add_argument("--repeats", type=_positive_int, default=3)
    p_demo.add_argument("--seed", type=int, default=0)
    p_chunks = sub.add_parser("chunks", help="time causal attention for several chunk sizes")
    p_chunks.add_argument("--length", type=_positive_int, default=8192)
    p_chunks.add_argument("--sizes", type=_positive_int, nargs="+", default=[32, 64, 128, 256, 512])
    p_chunks.add_argument("--heads", type=_positive_int, default=8)
    p_chunks.add_argument("--d", type=_positive_int, default=64)
    p_chunks.add_argument("--m", type=_positive_int, default=256)
    p_chunks.add_argument("--repeats", type=_positive_int, default=5)
    args = parser.parse_args(args_list)
    if args.command == "demo":
        if not (math.isfinite(args.input_std) and args.input_std > 0):
            parser.error(f"--input-std must be a positive number, got {args.input_std}")
        demo(
            args.lengths, heads=args.heads, d=args.d, m=args.m, input_std=args.input_std,
            repeats=args.repeats, seed=args.seed,
        )  # fmt: skip
    else:
        chunks(
            args.length,
            args.sizes,
            heads=args.heads,
            d=args.d,
            m=args.m,
            repeats=args.repeats,
            out=sys.stdout,
        )
    return 0
