"""A smoke run of the benchmark (tiny sizes) so that the script cannot rot."""

from __future__ import annotations

import json
import statistics

import pytest
from favorcore_backends import bench


def test_bench_smoke(tmp_path, capsys) -> None:
    result = bench.bench(
        [32, 64], heads=1, d=8, m=16, repeats=1, threads=1, methods=list(bench.METHODS),
        out_dir=tmp_path, plots=False, gemm_size=64,
    )  # fmt: skip
    rows = [r for r in result["rows"] if "error" not in r]
    assert rows, result["rows"]
    assert {r["method"] for r in rows} >= {"favorcore-numpy", "favorcore++-numpy"}
    costs = [r for r in result["ratios"] if r["method"] == "favorcore++-numpy"]
    assert len(costs) == 4  # 2 lengths x 2 modes, each against FAVOR+
    assert all(c["cost"] > 0 for c in costs)
    for r in rows:
        assert r["median_s"] > 0
        assert r["peak_mib"] >= 0
        assert r["gflops"] == pytest.approx(8 * r["L"] * 16 * 8 / r["median_s"] / 1e9)
        # the share of the GEMM rate measured in the case's own process
        assert r["gemm_gflops"] > 0
        assert r["pct_gemm"] == pytest.approx(100 * r["gflops"] / r["gemm_gflops"])
    assert not [r for r in result["rows"] if "error" in r], result["rows"]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["shape"] == {
        "heads": 1, "d": 8, "m": 16, "dtype": "float32", "threads": 1, "device": "cpu",
        "measure": "call",
    }  # fmt: skip
    assert "GEMM rate" in capsys.readouterr().out


def test_bench_train_smoke(tmp_path, capsys) -> None:
    """Training steps: every method with autodiff runs, the others are reported."""
    pytest.importorskip("torch")
    methods = [
        "favorcore-numpy",
        "favorcore-torch",
        "favorcore++-torch",
        "favor-module",
        "mha",
        "sdpa",
    ]
    result = bench.bench(
        [64], heads=2, d=8, m=16, repeats=1, threads=1, methods=methods,
        out_dir=tmp_path, plots=False, gemm_size=0, train=True,
    )  # fmt: skip
    assert not [r for r in result["rows"] if "error" in r], result["rows"]
    assert {r["method"] for r in result["rows"]} == set(methods) - {"favorcore-numpy"}
    assert "no autodiff" in result["skipped"]["favorcore-numpy"]
    for r in result["rows"]:
        assert r["median_s"] > 0
        assert r["forward_s"] > 0
        assert r["step_ratio"] == pytest.approx(r["median_s"] / r["forward_s"])
    out = capsys.readouterr().out
    assert "not run: favorcore-numpy" in out
    assert "step/forward" in out.splitlines()[1]
    assert (tmp_path / "bench-train.json").exists()
    assert any(r["peer"] == "mha" for r in result["ratios"])


def test_bench_says_slower_below_one() -> None:
    rows = [
        {"L": 8, "mode": "causal", "method": m, "median_s": t, "peak_mib": 1.0}
        for m, t in (("favorcore-torch", 2.0), ("sdpa", 1.0))
    ]
    (line,) = bench._ratios(rows)
    assert line["speedup"] == 0.5
    assert "2.00x slower" in line["text"]


def test_bench_exits_nonzero_when_nothing_ran(tmp_path, capsys) -> None:
    code = bench.main(["--lengths", "8", "--methods", "favorcore-cupy", "--out", str(tmp_path)])
    assert code == 1
    captured = capsys.readouterr()
    assert "not run: favorcore-cupy" in captured.out
    assert "nothing ran" in captured.err


def test_bench_rejects_bad_options() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--lengths", "0"])


def test_bench_bfloat16_smoke(tmp_path) -> None:
    """bfloat16 inputs: the backends that have the dtype run (NumPy has none)."""
    pytest.importorskip("torch")
    result = bench.bench(
        [32], heads=1, d=8, m=16, repeats=1, threads=1, methods=["favorcore-numpy", "favorcore-torch", "sdpa"],
        out_dir=tmp_path, plots=False, gemm_size=64, dtype="bfloat16",
    )  # fmt: skip
    assert not [r for r in result["rows"] if "error" in r], result["rows"]
    assert {r["method"] for r in result["rows"]} == {"favorcore-torch", "sdpa"}
    assert result["shape"]["dtype"] == "bfloat16"
    assert all(r["median_s"] > 0 and r["gemm_gflops"] > 0 for r in result["rows"])


def test_bench_backends_by_device_and_dtype() -> None:
    assert bench.supports("numpy", "cpu", "float32")
    assert not bench.supports("numpy", "gpu", "float32")
    assert not bench.supports("numpy", "cpu", "bfloat16")
    assert bench.supports("cupy", "gpu", "float32")
    assert not bench.supports("cupy", "cpu", "float32")
    assert not bench.supports("cupy", "gpu", "bfloat16")
    assert all(bench.supports(b, dev, t) for b in ("torch", "jax") for dev in bench.DEVICES
               for t in bench.DTYPES)  # fmt: skip


def test_bench_gpu_without_a_gpu_says_so(tmp_path) -> None:
    """On a machine without a GPU each GPU case reports why instead of timing the CPU."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    result = bench.bench(
        [32], heads=1, d=8, m=16, repeats=1, threads=1, methods=["favorcore-torch"],
        out_dir=tmp_path, plots=False, gemm_size=64, device="gpu",
    )  # fmt: skip
    assert [r["error"] for r in result["rows"]] == ["RuntimeError: PyTorch sees no CUDA GPU"] * 2


def test_bench_scale_only_on_the_cpu() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--scale", "--device", "gpu"])


def test_bench_rounds_alternate_the_order_and_pool_the_timings(tmp_path, monkeypatch) -> None:
    calls: list[tuple[str, int]] = []
    measure = bench.measure

    def spied(method, length, causal, **kw):
        calls.append((method, length))
        return measure(method, length, causal, **kw)

    monkeypatch.setattr(bench, "measure", spied)
    methods = ["favorcore-numpy", "favorcore++-numpy"]
    result = bench.bench(
        [32], heads=1, d=8, m=16, repeats=2, threads=1, methods=methods, out_dir=tmp_path,
        plots=False, gemm_size=0, rounds=3,
    )  # fmt: skip
    one_mode = methods + methods[::-1] + methods  # every other round reversed
    assert [x for x, _ in calls] == one_mode + one_mode  # bidirectional, then causal
    for r in result["rows"]:
        assert r["rounds"] == 3
        assert len(r["times"]) == 6  # 2 timed calls in each of the 3 processes
        assert r["median_s"] == statistics.median(r["times"])
