"""Safe in a real process: fork, threads, exceptions at any step, other threads' BLAS.

Nothing favorcore changes in the process (threads, BLAS limits, floating-point modes) may
outlive a call or reach threads it does not own.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import platform
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import Backend, to_numpy

import favorcore as fc
from favorcore.steps import Steps, register_steps, steps_for

threadpoolctl = pytest.importorskip("threadpoolctl")

FMAP = fc.PositiveFeatures(m=64, seed=0)


def _inputs(n: int = 3000) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    return tuple((rng.standard_normal((4, n, 32)) / 2).astype(np.float32) for _ in range(3))


def _blas_threads() -> dict[str, int]:
    """Each loaded BLAS library's thread count (a library loaded later, e.g. by another
    framework a test imports, adds an entry; none of the others may change)."""
    return {c.filepath: c.num_threads for c in threadpoolctl.ThreadpoolController().lib_controllers
            if c.user_api == "blas"}  # fmt: skip


def _same_blas(before: dict[str, int]) -> bool:
    now = _blas_threads()
    return all(now.get(path, n) == n for path, n in before.items())


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """BLAS limited to one thread by the caller: the NumPy steps then run work items on
    threads of their own."""
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield


MODES = {"blas threads": contextlib.nullcontext, "one BLAS thread": _one_blas_thread}


def _favorcore_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("favorcore")]


def _child(conn, q, k, v, causal) -> None:  # runs in the forked child
    out = fc.favor_attention(q, k, v, features=FMAP, causal=causal)
    conn.send(out)
    conn.close()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("causal", [False, True])
# JAX, when another test module imported it, warns at every fork about its own threads
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_a_forked_child_computes_after_the_parents_call(mode: str, causal: bool) -> None:
    # fork (multiprocessing's default on Linux before 3.14, PyTorch's DataLoader workers)
    # copies only the calling thread: a pool made by the parent would not exist in the
    # child, which would then wait for it forever.
    if not hasattr(multiprocessing, "get_context") or sys.platform == "win32":
        pytest.skip("no fork on this platform")
    q, k, v = _inputs()
    with MODES[mode]():
        want = fc.favor_attention(q, k, v, features=FMAP, causal=causal)
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(child, q, k, v, causal))
        proc.start()
        child.close()
        ready = parent.poll(120)  # a regression fails here instead of hanging
        got = parent.recv() if ready else None
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert ready, "the forked child did not answer within 120 s"
    assert proc.exitcode == 0
    np.testing.assert_array_equal(got, want)


def _concurrent(fn, n: int) -> list[object]:
    results: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = fn()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("causal", [False, True])
def test_twelve_threads_at_once_give_the_serial_result(
    backend: Backend, mode: str, causal: bool
) -> None:
    # bit for bit on NumPy and array-api-strict; PyTorch and JAX within their own kernels'
    # determinism (their intra-op threads may split reductions as they please): float32
    # rounding of the sums, gamma_n with n = 1500 keys and 64 features, relative
    exact = backend.name in ("numpy", "array_api_strict")
    tol = 0.0 if exact else 2 * (1500 + 64) * float(np.finfo(np.float32).eps)
    q, k, v = (backend.asarray(a, backend.xp.float32) for a in _inputs(1500))
    calls = [  # FAVOR+, and the default estimator (its balance and A from the call's tokens)
        lambda: fc.favor_attention(q, k, v, features=FMAP, causal=causal),
        lambda: fc.favor_attention(q, k, v, causal=causal),
    ]
    blas = _blas_threads()
    with MODES[mode]():
        serial = [to_numpy(c()) for c in calls]
        got = _concurrent(lambda: [to_numpy(c()) for c in calls], 12)
    for result in got:
        for a, b in zip(result, serial, strict=True):  # type: ignore[call-overload]
            np.testing.assert_allclose(a, b, rtol=tol, atol=0)
    assert _same_blas(blas)  # and the process's BLAS is as it was
    assert not _favorcore_threads()


class _Failing(Steps):
    """The registered steps, but ``operation`` raises ``error`` at its ``at``-th call."""

    def __init__(self, inner: Steps, operation: str, at: int, error: BaseException) -> None:
        super().__init__(block=inner.block, chunk=inner.chunk, vectorized=inner.vectorized)
        self.inner, self.operation, self.at, self.error = inner, operation, at, error
        self.seen, self.lock = 0, threading.Lock()

    @property
    def workers(self) -> int:  # type: ignore[override]
        return self.inner.workers

    def _count(self, operation: str) -> None:
        if operation == self.operation:
            with self.lock:
                self.seen += 1
                fail = self.seen == self.at
            if fail:
                raise self.error

    def blocks(self, *args):  # type: ignore[no-untyped-def]
        return self.inner.blocks(*args)

    def fits(self, *args):  # type: ignore[no-untyped-def]
        return self.inner.fits(*args)

    def output(self, *args):  # type: ignore[no-untyped-def]
        return self.inner.output(*args)

    def keys(self, *args):  # type: ignore[no-untyped-def]
        self._count("keys")
        return self.inner.keys(*args)

    def key_sums(self, *args):  # type: ignore[no-untyped-def]
        self._count("key_sums")
        return self.inner.key_sums(*args)

    def answer(self, *args):  # type: ignore[no-untyped-def]
        self._count("answer")
        return self.inner.answer(*args)

    def causal(self, *args):  # type: ignore[no-untyped-def]
        self._count("causal")
        return self.inner.causal(*args)

    def map(self, fn, items):  # type: ignore[no-untyped-def]
        self._count("map")
        return self.inner.map(fn, items)


def _ftz_active() -> bool:
    """Whether this thread flushes denormal results to zero."""
    a = np.array([2.0**-100], dtype=np.float32)
    with np.errstate(under="ignore"):
        return float((a * np.float32(2.0**-40))[0]) == 0.0


#: (operation, causal, the calls it fails at): every operation of a call, first and later
STEPS_OF_A_CALL = [
    ("keys", False, (1, 2, 5)), ("key_sums", False, (1, 5)), ("answer", False, (1, 5)),
    ("map", False, (1, 2)), ("keys", True, (1, 5)), ("causal", True, (1, 2, 7)),
    ("map", True, (1,)),
]  # fmt: skip


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(("operation", "causal", "calls"), STEPS_OF_A_CALL)
@pytest.mark.parametrize(
    "error", [ValueError("injected"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
def test_an_exception_at_any_step_leaves_nothing_behind(
    mode: str, operation: str, causal: bool, calls: tuple[int, ...], error: BaseException
) -> None:
    # An exception (or an interrupt) raised by any operation, in the calling thread or in
    # one of favorcore's: it reaches the caller, every thread is joined, no mode or limit
    # stays set, and the next call gives the same result as before.
    import array_api_compat.numpy as xp

    q, k, v = _inputs(2500)
    registered = steps_for(xp)
    blas = _blas_threads()
    with MODES[mode]():
        want = fc.favor_attention(q, k, v, features=FMAP, causal=causal)
        for at in calls:
            failing = _Failing(registered, operation, at, error)
            register_steps(xp.__name__, failing)
            try:
                with pytest.raises(type(error)):
                    fc.favor_attention(q, k, v, features=FMAP, causal=causal)
            finally:
                register_steps(xp.__name__, registered)
            assert failing.seen >= at
            assert not _favorcore_threads()
            assert not _ftz_active()
            np.testing.assert_array_equal(
                fc.favor_attention(q, k, v, features=FMAP, causal=causal), want
            )
    assert _same_blas(blas)


def test_numpy_in_other_threads_keeps_its_blas_threads() -> None:
    # During a call, a NumPy product in another thread runs with the process's BLAS
    # threads: favorcore changes no BLAS setting.
    import array_api_compat.numpy as xp

    blas = _blas_threads()
    seen: list[dict[str, int]] = []
    registered = steps_for(xp)

    class Watching(type(registered)):  # type: ignore[misc]
        def key_sums(self, *args):  # type: ignore[no-untyped-def]
            reader = threading.Thread(target=lambda: seen.append(_blas_threads()))
            reader.start()
            reader.join()
            return super().key_sums(*args)

    watching = Watching.__new__(Watching)
    watching.__dict__.update(registered.__dict__)
    q, k, v = _inputs()
    register_steps(xp.__name__, watching)
    try:
        fc.favor_attention(q, k, v, features=FMAP)
    finally:
        register_steps(xp.__name__, registered)
    assert seen
    assert all(all(s.get(path, n) == n for path, n in blas.items()) for s in seen)
    assert _same_blas(blas)


def test_threads_run_only_where_blas_runs_one() -> None:
    # favorcore's own threads run work items only when BLAS runs one thread (then none of
    # BLAS's compete with them); they are joined before the call returns.
    import array_api_compat.numpy as xp

    steps = steps_for(xp)
    if steps.max_workers < 2:  # type: ignore[attr-defined]
        pytest.skip("one core: no threads of favorcore's")
    names: set[str] = set()
    registered = steps

    class Watching(type(registered)):  # type: ignore[misc]
        def keys(self, *args):  # type: ignore[no-untyped-def]
            names.add(threading.current_thread().name)
            return super().keys(*args)

    watching = Watching.__new__(Watching)
    watching.__dict__.update(registered.__dict__)
    q, k, v = _inputs()
    register_steps(xp.__name__, watching)
    try:
        if any(n > 1 for n in _blas_threads().values()):
            fc.favor_attention(q[:1], k[:1], v[:1], features=FMAP)
            assert names == {threading.current_thread().name}
        names.clear()
        with _one_blas_thread():
            fc.favor_attention(q[:1], k[:1], v[:1], features=FMAP)
        # (the items are shared out as each thread asks, so which thread gets which varies)
        assert "favorcore" in names
        assert names <= {"favorcore", threading.current_thread().name}
    finally:
        register_steps(xp.__name__, registered)
    assert not _favorcore_threads()


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="flush-to-zero is set only on x86-64 Linux",
)
def test_flush_to_zero_never_outlives_its_product() -> None:
    # The NumPy causal scores set flush-to-zero in the calling thread for one product:
    # after any call (and in other threads meanwhile) gradual underflow is as before.
    q, k, v = _inputs()
    k = k * 8  # keys of large norm: their features underflow in the scores
    fc.favor_attention(q, k, v, features=FMAP, causal=True)
    assert not _ftz_active()
