"""The Dask adapter: block-by-block attention on a local distributed cluster."""

from __future__ import annotations

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
fdask = pytest.importorskip("favorcore_backends.dask")

import dask

import favorcore as fc

FMAP = fc.PositiveFeatures(m=32, seed=0)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def _inputs(lq=600, lk=600, d=8, dv=5):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, lq, d)) / 2
    k = rng.standard_normal((2, 3, lk, d)) / 2
    v = rng.standard_normal((2, 3, lk, dv))
    mask = rng.random((2, 3, lk)) < 0.8
    return q, k, v, mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunks", [600, 150, (100, 250, 50, 200)])
def test_blockwise_equals_the_numpy_path(client, causal: bool, masked: bool, chunks) -> None:
    q, k, v, mask = _inputs()
    lazy = [da.from_array(a, chunks=(2, 3, chunks, a.shape[-1])) for a in (q, k, v)]
    dmask = da.from_array(mask, chunks=(2, 3, chunks)) if masked else None
    out = fdask.favor_attention(*lazy, features=FMAP, causal=causal, key_mask=dmask, chunk_size=64)
    assert out.chunks[-2] == lazy[0].chunks[-2]
    got = client.compute(out).result()
    want = fc.favor_attention(
        q, k, v, features=FMAP, causal=causal, key_mask=mask if masked else None
    )
    # sums in another order: float64 rounding over 600 keys
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_cross_attention_with_different_chunking(client) -> None:
    q, k, v, mask = _inputs(lq=300, lk=700)
    out = fdask.favor_attention(
        da.from_array(q, chunks=(2, 3, 100, 8)), da.from_array(k, chunks=(2, 3, 350, 8)),
        da.from_array(v, chunks=(2, 3, 350, 5)), features=FMAP, key_mask=da.from_array(mask, chunks=(2, 3, 175)),
    )  # fmt: skip
    want = fc.favor_attention(q, k, v, features=FMAP, key_mask=mask)
    np.testing.assert_allclose(client.compute(out).result(), want, rtol=0, atol=1e-12)


def test_no_task_reads_more_than_its_blocks() -> None:
    # Every task of the graph reads at most one chunk of each input (its block), never
    # the whole sequence: the engine's blocks are the chunks.
    q, k, v, mask = _inputs()
    lazy = [
        da.from_array(a, chunks=(2, 3, 100, a.shape[-1]), name=n)
        for a, n in zip((q, k, v), "qkv", strict=False)
    ]
    dmask = da.from_array(mask, chunks=(2, 3, 100), name="mask")
    for causal in (False, True):
        out = fdask.favor_attention(*lazy, features=FMAP, causal=causal, key_mask=dmask,
                                    balance=False)  # fmt: skip
        graph = dict(out.__dask_graph__())
        inputs = {
            key for key in graph if isinstance(key, tuple) and key[0] in ("q", "k", "v", "mask")
        }
        assert len(inputs) == 4 * 6
        for key in graph:
            deps = dask.core.get_dependencies(graph, key) & inputs
            names = [d[0] for d in deps]
            assert len(names) == len(set(names)), (key, deps)


def test_bad_inputs_raise() -> None:
    q, k, v, _ = _inputs()
    lazy = [da.from_array(a, chunks=(2, 3, 100, a.shape[-1])) for a in (q, k, v)]
    with pytest.raises(TypeError, match="k must be a dask array"):
        fdask.favor_attention(lazy[0], k, lazy[2], features=FMAP)
    with pytest.raises(ValueError, match="chunked alike"):
        fdask.favor_attention(
            lazy[0], lazy[1].rechunk((2, 3, 200, 8)), lazy[2], features=FMAP, causal=True
        )
    with pytest.raises(TypeError, match="key_mask must be a dask array"):
        fdask.favor_attention(*lazy, features=FMAP, key_mask=np.ones((2, 3, 600), dtype=bool))
    with pytest.raises(ValueError, match=r"key_mask must have shape batch \+ \(Lk,\)"):
        fdask.favor_attention(*lazy, features=FMAP, key_mask=da.ones((2, 3, 5), dtype=bool))


@pytest.mark.parametrize("causal", [False, True])
def test_favorpp_and_given_statistics_blockwise(client, causal: bool) -> None:
    # FAVOR++ with A from the data: bidirectional blocks share the statistics of the
    # whole sequence (computed first); causal blocks use statistics given by the caller.
    q, k, v, mask = _inputs()
    fmap = fc.OptimalPositiveFeatures(m=32, seed=0)
    lazy = [da.from_array(a, chunks=(2, 3, 150, a.shape[-1])) for a in (q, k, v)]
    dmask = da.from_array(mask, chunks=(2, 3, 150))
    balance = fc.balance_statistics(q[..., :100, :], k[..., :100, :]) if causal else None
    out = fdask.favor_attention(
        *lazy, features=fmap, causal=causal, key_mask=dmask, balance=balance
    )
    want = fc.favor_attention(q, k, v, features=fmap, causal=causal, key_mask=mask, balance=balance)
    np.testing.assert_allclose(client.compute(out).result(), want, rtol=0, atol=1e-12)
    if causal:
        with pytest.raises(ValueError, match="computes statistics from each call's tokens"):
            fdask.favor_attention(*lazy, features=fmap, causal=True)
