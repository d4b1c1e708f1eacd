"""The ``favorcore`` command line (also ``python -m favorcore``): ``demo``, ``chunks``,
``bench``.

Subcommands are registered in one place, :data:`DELEGATED` (subcommands that parse their
own options, imported only when they run, as ``bench``) and :func:`_build_parser` (the
built-in ones).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import numpy as np

from .attention import favor_attention, softmax_attention
from .balance import balance_statistics
from .diagnostics import ErrorEstimate, estimate_error
from .features import OptimalPositiveFeatures, PositiveFeatures
from .steps import namespace_of

__all__ = ["DELEGATED", "main", "structured_inputs", "version"]

#: Subcommands that parse their own options: name -> (one-line help, "module:function").
#: The module is imported only when the subcommand runs, and the function is called with
#: the arguments after the subcommand's name, returning the exit status. A new subcommand
#: of this kind is one entry here.
DELEGATED: dict[str, tuple[str, str]] = {
    "bench": (
        "side-by-side benchmark against other implementations (favorcore bench --help)",
        "favorcore_backends.bench:main",
    ),
    "protein": (
        (
            "train and evaluate protein language models (favorcore protein --help; "
            "pip install '.[protein]')"
        ),
        "favorcore_backends.protein.cli:main",
    ),
}

DESCRIPTION = """\
favorcore: FAVOR (Performer) attention for every Array API framework. Softmax attention
softmax(q k^T / sqrt(d)) v is estimated with m random features in O(L m d) instead of
O(L^2 d).

The default estimator (features=None) is FAVOR++, OptimalPositiveFeatures(m=256, seed=0),
with the exact matrix balance computed from each bidirectional call's tokens. A causal
call takes the balance and A from given statistics (balance=balance_statistics(...) of a
calibration batch); without them it runs the causal-safe form: no balance, A = 0.
"""

EPILOG = """\
examples:
  favorcore demo                      error and run time against exact attention (NumPy)
  favorcore demo --lengths 1024 --m 64
  favorcore chunks --length 4096      time causal attention per chunk size
  favorcore bench --help              the benchmark's own options
"""


def version() -> str:
    """The installed distribution's version (the package's own when not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("favorcore")
    except PackageNotFoundError:
        from . import __version__

        return __version__


class Progress:
    """A minimal progress bar on a stream (stderr): ``label [#####.....] 5/10``.

    Drawn only when the stream is a terminal (``enabled=None``): carriage-return frames
    have no place in a log file or a pipe.
    """

    def __init__(
        self,
        total: int,
        label: str,
        stream: TextIO | None = None,
        width: int = 30,
        enabled: bool | None = None,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.total, self.label, self.width, self.done = total, label, width, 0
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty()) if callable(isatty) else False
        self.enabled = enabled
        self.draw()

    def advance(self, what: str = "") -> None:
        """Count one step done; ``what`` names the step now running."""
        self.done += 1
        self.draw(what)

    def draw(self, what: str = "") -> None:
        """Redraw the bar; ``what`` names the step now running."""
        if not self.enabled:
            return
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if self.done >= self.total else ""
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {what:<28}{end}")
        self.stream.flush()


def _median_time(
    fn: Callable[[], Any], repeats: int, budget: float = math.inf
) -> tuple[float, Any]:
    """Median time of ``repeats`` calls of ``fn`` and its last result; no more calls once
    ``budget`` seconds have been spent (at least one call)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        if sum(times) > budget:
            break
    return statistics.median(times), out


def structured_inputs(
    rng: np.random.Generator,
    *,
    heads: int,
    d: int,
    topics: int = 4,
    norm: float = 4.0,
    noise: float = 0.15,
    dtype: Any = np.float32,
) -> Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A generator of ``(heads, L, d)`` queries, keys and values with a shared low-rank
    structure, whose attention is far from uniform: ``draw(L) -> (q, k, v)``.

    Each head has ``topics`` random unit directions ``c_t`` and value vectors
    ``u_t ~ N(0, I)``. Each token picks a topic ``t`` uniformly and gets
    ``q = norm c_t + noise N(0, I)``, ``k = norm c_t + noise N(0, I)`` (independent noise)
    and ``v = u_t + N(0, I)``: queries attend mostly to the keys of their own topic, and
    what they read there is that topic's value. Every draw shares the directions, so a
    later draw is a calibration batch of the same distribution.
    """
    centres = rng.standard_normal((heads, topics, d))
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    values = rng.standard_normal((heads, topics, d))
    rows = np.arange(heads)[:, None]

    def draw(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = rng.integers(0, topics, size=(heads, length))
        q = norm * centres[rows, t] + noise * rng.standard_normal((heads, length, d))
        k = norm * centres[rows, t] + noise * rng.standard_normal((heads, length, d))
        v = values[rows, t] + rng.standard_normal((heads, length, d))
        return q.astype(dtype), k.astype(dtype), v.astype(dtype)

    return draw


def _relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    """``|approx - exact|_F / |exact|_F``."""
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def _uniform(v: np.ndarray, causal: bool) -> np.ndarray:
    """The trivial baseline: the values averaged without attending (causal: the mean of
    the values up to each position)."""
    v64 = v.astype(np.float64)
    if causal:
        return np.cumsum(v64, axis=-2) / np.arange(1, v.shape[-2] + 1)[:, None]
    return np.broadcast_to(v64.mean(axis=-2, keepdims=True), v.shape)


def _entropy(q: np.ndarray, k: np.ndarray, causal: bool, rows: int = 256) -> tuple[float, float]:
    """Mean entropy (nats) of the exact attention rows, on up to ``rows`` query positions
    evenly spread along the sequence, and its mean fraction of the largest possible
    (``log`` of the number of keys a row sees: ``L``, or ``i + 1`` when causal)."""
    length, d = k.shape[-2], q.shape[-1]
    pos = np.unique(np.linspace(1 if causal else 0, length - 1, min(rows, length)).astype(int))
    logits = q[:, pos].astype(np.float64) @ np.swapaxes(k.astype(np.float64), -1, -2) / math.sqrt(d)
    if causal:
        logits = np.where(np.arange(length)[None, :] <= pos[:, None], logits, -np.inf)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
    seen = (pos + 1) if causal else np.full(pos.shape, length)
    return float(h.mean()), float((h / np.log(np.maximum(seen, 2))).mean())


def demo(
    lengths: Sequence[int],
    *,
    heads: int = 4,
    d: int = 64,
    m: int = 256,
    topics: int = 4,
    norm: float = 4.0,
    noise: float = 0.15,
    repeats: int = 3,
    seed: int = 0,
    poor_case: bool = True,
    out: TextIO | None = None,
    progress: TextIO | None = None,
) -> list[dict[str, Any]]:
    """Compare favorcore's default estimator with exact attention (NumPy float32).

    The estimator is what ``features=None`` means with ``m`` features: FAVOR++
    (``OptimalPositiveFeatures(m, seed)``) with the exact matrix balance from each call's
    tokens when bidirectional; when causal, the balance and ``A`` from calibrated
    statistics (:func:`balance_statistics` of 512 other tokens of the same distribution),
    and, as a call without statistics runs, the causal-safe form (no balance, ``A = 0``).
    The inputs come from :func:`structured_inputs` (``topics``, ``norm``, ``noise``).

    The error is the relative Frobenius error ``|out - exact|_F / |exact|_F``, printed
    beside that of the trivial baseline (the values averaged without attending) and the
    exact attention's entropy; times are medians of ``repeats`` calls (fewer where they
    take over a second together). With
    ``poor_case``, :func:`estimate_error` is then shown on inputs where FAVOR is poor,
    with what to do about it.

    Returns the rows of the table as dictionaries.
    """
    out = sys.stdout if out is None else out
    rng = np.random.default_rng(seed)
    fmap = OptimalPositiveFeatures(m=m, seed=seed)
    warm = rng.standard_normal((1, 8, d)).astype(np.float32)
    favor_attention(warm, warm, warm, features=fmap)  # draws and caches the projection
    draw = structured_inputs(rng, heads=heads, d=d, topics=topics, norm=norm, noise=noise)
    stats = balance_statistics(*draw(512)[:2])  # causal attention: statistics fixed beforehand
    # (mode, causal, the map, balance): the last is what features=None runs in a causal call
    # without statistics (an explicit data-dependent map there is refused, not downgraded)
    modes = (
        ("bidirectional", False, fmap, None),
        ("causal", True, fmap, stats),
        ("causal, no stats", True, fmap.causal_form(), None),
    )
    bar = Progress(len(lengths) * 5, "favorcore demo", stream=progress)
    rows: list[dict[str, Any]] = []
    for n in lengths:
        q, k, v = draw(n)
        exact_by_mode: dict[bool, tuple[float, np.ndarray]] = {}
        for mode, causal, features, given in modes:
            bar.draw(f"L={n} {mode}: FAVOR")
            call = functools.partial(
                favor_attention, q, k, v, features=features, causal=causal, balance=given
            )
            t_favor, approx = _median_time(call, repeats, budget=1.0)
            bar.advance(f"L={n} {mode}: exact")
            if causal not in exact_by_mode:
                exact_by_mode[causal] = _median_time(
                    functools.partial(softmax_attention, q, k, v, causal=causal), repeats, 1.0
                )
                bar.advance()
            t_exact, exact = exact_by_mode[causal]
            h, h_frac = _entropy(q, k, causal)
            rows.append({
                "L": n, "mode": mode, "rel_error": _relative_error(approx, exact),
                "uniform_error": _relative_error(_uniform(v, causal), exact),
                "entropy": h, "entropy_fraction": h_frac, "favor_s": t_favor, "exact_s": t_exact,
            })  # fmt: skip
    default = (
        "features=None"
        if (m, seed) == (256, 0)
        else f"the map of features=None, with m={m}, seed={seed}"
    )
    print(
        f"\nfavorcore's default estimator ({default}) vs exact softmax attention\n"
        f"(NumPy float32, {heads} heads, d={d}, m={m}, seed={seed}):\n"
        f"  bidirectional: FAVOR++ with the exact matrix balance from the call's tokens\n"
        f"  causal: the balance and A from statistics calibrated on 512 other tokens\n"
        f"  causal, no stats: what a causal call without statistics runs (no balance, A = 0)\n"
        f"inputs: {topics} topics per head, q, k = {norm:g} * topic direction + {noise:g} * "
        "N(0, I), v = topic value + N(0, I)\n"
        "error: |out - exact|_F / |exact|_F; 'uniform': that of averaging the values without "
        "attending;\nentropy: exact attention's mean row entropy, nats and fraction of "
        "log(keys seen)",
        file=out,
    )
    header = (
        f"{'L':>6} {'mode':<17} {'error':>7} {'uniform':>8} {'entropy':>13} "
        f"{'FAVOR ms':>9} {'exact ms':>9} {'speed-up':>9}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        ratio = r["exact_s"] / r["favor_s"]
        speed = f"{ratio:.2f}x" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        print(
            f"{r['L']:>6} {r['mode']:<17} {r['rel_error']:>7.3f} {r['uniform_error']:>8.3f} "
            f"{r['entropy']:>5.2f} ({r['entropy_fraction']:>4.0%}) "
            f"{1e3 * r['favor_s']:>9.1f} {1e3 * r['exact_s']:>9.1f} {speed:>9}",
            file=out,
        )
    if poor_case:
        _poor_cases(heads=heads, d=d, m=m, seed=seed, out=out)
    return rows


def _poor_cases(*, heads: int, d: int, m: int, seed: int, out: TextIO) -> None:
    """Two inputs where the default estimator is poor, as :func:`estimate_error` shows."""
    ms = tuple(sorted({max(m // 4, 2) // 2 * 2, m, 4 * m}))
    rng = np.random.default_rng(seed + 1)
    q, k, v = structured_inputs(rng, heads=heads, d=d, norm=6.0, noise=0.3)(512)
    gauss = [rng.standard_normal((heads, 512, d)).astype(np.float32) for _ in range(3)]
    cases = [
        (
            "inputs as above with larger norms, q, k = 6 * topic direction + 0.3 * N(0, I)",
            (q, k, v),
        ),
        (f"q, k, v ~ N(0, I): |q| and |k| about sqrt(d) = {math.sqrt(d):.0f}", gauss),
    ]
    for title, (cq, ck, cv) in cases:
        est = estimate_error(cq, ck, cv, ms=ms, seeds=2, sample=512)
        print(f"\nA poor case: {title}.\nfavorcore.estimate_error(q, k, v, ms={ms}):", file=out)
        print(est, file=out)
        print(textwrap.fill(_advice(est, m), width=88), file=out)


def _advice(est: ErrorEstimate, m: int) -> str:
    """What to do, from what :func:`estimate_error` found."""
    at_m = dict(zip(est.ms, est.errors, strict=True)).get(m)
    now = f" (error {at_m:.2f} at m = {m})" if at_m is not None else ""
    if est.suggested_m is not None and est.suggested_m <= m:
        return f"what to do: nothing{now}; m = {est.suggested_m} is enough."
    if est.suggested_m is not None:
        return (
            f"what to do: more features{now}: m = {est.suggested_m} reaches the target "
            f"{est.target} (the cost grows linearly with m)."
        )
    first, last = est.errors[0], est.errors[-1]
    return (
        f"what to do: more features barely help here (m = {est.ms[0]} -> {est.ms[-1]}: "
        f"{first:.2f} -> {last:.2f}); the logits spread too far for random features, whose "
        "variance grows like exp(|x + y|^2). Make the norms smaller (normalise queries and "
        "keys, e.g. LayerNorm or QK-norm before attention, or a smaller scale=) or keep "
        "exact attention for this layer."
    )


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
    print(
        f"causal FAVOR+ (PositiveFeatures), NumPy float32, {heads} heads, L={length}, d={d}, "
        f"m={m}, q, k, v ~ N(0, 0.5^2)",
        file=out,
    )
    print(f"{'chunk':>7} {'median ms':>10}", file=out)
    for c in sizes:
        t, _ = _median_time(
            functools.partial(favor_attention, q, k, v, features=fmap, causal=True, chunk_size=c),
            repeats,
        )
        mark = "  (default)" if c == default else ""
        print(f"{c:>7} {1e3 * t:>10.1f}{mark}", file=out)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _even_int(text: str) -> int:
    value = _positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(
            f"expected a positive even integer (FAVOR++ draws +-w pairs), got {text!r}"
        )
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    demo(
        args.lengths, heads=args.heads, d=args.d, m=args.m, topics=args.topics,
        norm=args.norm, noise=args.noise, repeats=args.repeats, seed=args.seed,
        poor_case=not args.no_poor_case,
    )  # fmt: skip
    return 0


def _run_chunks(args: argparse.Namespace) -> int:
    chunks(args.length, args.sizes, heads=args.heads, d=args.d, m=args.m,
           repeats=args.repeats, out=sys.stdout)  # fmt: skip
    return 0


def _build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="favorcore", description=DESCRIPTION, epilog=EPILOG, formatter_class=raw
    )
    parser.add_argument("--version", action="version", version=f"favorcore {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    # -- the subcommands: those that parse their own options (DELEGATED), then the built-in
    for name, (text, _) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)

    p = sub.add_parser(
        "demo",
        help="the default estimator against exact attention on NumPy: error and run time",
        description=(
            "Compare favorcore's default estimator with exact softmax attention on NumPy\n"
            "(float32), bidirectional and causal, for a few sequence lengths.\n\n"
            "Inputs: each head has a few topics (random unit directions, each with a value\n"
            "vector); each token picks a topic, q, k = NORM * its direction + NOISE * N(0, I)\n"
            "and v = its topic's value + N(0, I), so attention is far from uniform.\n\n"
            "Printed per length and mode: the relative error |out - exact|_F / |exact|_F,\n"
            "that of the trivial baseline (averaging the values without attending), the\n"
            "exact attention's mean row entropy, and both run times. Then favorcore.\n"
            "estimate_error on two inputs where FAVOR is poor, and what to do about them.\n\n"
            "The estimator is what features=None means (with --m features): FAVOR++ with the\n"
            "exact matrix balance per bidirectional call; causal calls with statistics from\n"
            "a calibration batch, and without them (no balance, A = 0)."
        ),
        formatter_class=raw,
    )
    p.add_argument(
        "--lengths",
        type=_positive_int,
        nargs="+",
        default=[512, 2048, 8192],
        metavar="L",
        help="sequence lengths (default: 512 2048 8192)",
    )
    p.add_argument("--heads", type=_positive_int, default=4, help="attention heads (default: 4)")
    p.add_argument("--d", type=_positive_int, default=64, help="head dimension (default: 64)")
    p.add_argument(
        "--m",
        type=_even_int,
        default=256,
        help="random features, even (default: 256, the default estimator's)",
    )
    p.add_argument(
        "--topics", type=_positive_int, default=4, help="topics per head in the inputs (default: 4)"
    )
    p.add_argument(
        "--norm",
        type=_positive_float,
        default=4.0,
        help="norm of the topic directions in q and k (default: 4)",
    )
    p.add_argument(
        "--noise",
        type=_non_negative_float,
        default=0.15,
        help="standard deviation of the noise added to q and k (default: 0.15)",
    )
    p.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="timed calls per measurement, the median reported; fewer once they "
        "take a second together (default: 3)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the inputs and of the features (default: 0)"
    )
    p.add_argument(
        "--no-poor-case", action="store_true", help="skip the estimate_error part (the poor cases)"
    )
    p.set_defaults(run=_run_demo)

    p = sub.add_parser(
        "chunks",
        help="time causal attention for several chunk sizes",
        description=(
            "Time causal FAVOR+ attention (PositiveFeatures) on NumPy float32 for several\n"
            "chunk sizes (the chunk_size argument) and mark the default."
        ),
        formatter_class=raw,
    )
    p.add_argument(
        "--length", type=_positive_int, default=8192, help="sequence length (default: 8192)"
    )
    p.add_argument(
        "--sizes",
        type=_positive_int,
        nargs="+",
        default=[32, 64, 128, 256, 512],
        metavar="C",
        help="chunk sizes (default: 32 64 128 256 512)",
    )
    p.add_argument("--heads", type=_positive_int, default=8, help="attention heads (default: 8)")
    p.add_argument("--d", type=_positive_int, default=64, help="head dimension (default: 64)")
    p.add_argument("--m", type=_positive_int, default=256, help="random features (default: 256)")
    p.add_argument(
        "--repeats",
        type=_positive_int,
        default=5,
        help="timed calls per size, the median reported (default: 5)",
    )
    p.set_defaults(run=_run_chunks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``favorcore`` console script; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] and args_list[0] in DELEGATED:  # they parse their own options
        module, _, function = DELEGATED[args_list[0]][1].partition(":")
        run: Callable[[list[str]], int] = getattr(importlib.import_module(module), function)
        return run(args_list[1:])
    args = _build_parser().parse_args(args_list)
    try:
        status: int = args.run(args)
    except BrokenPipeError:  # e.g. piped into head: stop quietly, as other tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    return status
