"""How well FAVOR estimates a trained PerformerLM's attention, layer by layer.

Usage: ``python docs/scripts/protein_attention_error.py RUN [--m 256 1024 4096 16384]``,
where RUN is a ``favorcore protein`` output directory of a masked model trained with exact
attention. It records every layer's queries, keys and values (after the rotary rotation)
on held-out proteins, and prints the query and key norms and the relative error
``|FAVOR - softmax| / |softmax|`` (Frobenius, real tokens) of favorcore's default
estimator and of plain FAVOR+ against exact softmax attention in float64, for each m.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def main() -> None:
    import torch
    from favorcore_backends.models import PerformerLM
    from favorcore_backends.models.performer import PerformerConfig
    from favorcore_backends.protein import cli
    from favorcore_backends.protein.data import collate

    import favorcore as fc

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--m", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--proteins", type=int, default=8)
    opts = p.parse_args()
    torch.set_num_threads(1)
    saved = torch.load(opts.run / "checkpoint.pt", weights_only=True, map_location="cpu")
    args = argparse.Namespace(**saved["args"])
    args.fasta = [Path(f) for f in args.fasta] if args.fasta else None
    setup = cli._setup(args)
    model = PerformerLM(PerformerConfig(**saved["config"]))
    model.load_state_dict(saved["model"])
    model.eval()
    batch = collate(setup.test[: opts.proteins], setup.tok)
    seen: dict[int, tuple[Any, ...]] = {}
    for i, layer in enumerate(model.attention_modules()):

        def record(q: Any, k: Any, v: Any, *rest: Any, i: int = i, f: Any = layer._exact) -> Any:
            seen[i] = (q.double(), k.double(), v.double())
            return f(q, k, v, *rest)

        layer._exact = record  # type: ignore[method-assign]
    with torch.no_grad():
        model(batch.tokens, key_mask=batch.key_mask)
    mask = batch.key_mask[:, None, :]
    real = mask[..., None].expand(-1, model.config.n_heads, -1, -1)
    maps = {
        "default": lambda m: {"features": fc.OptimalPositiveFeatures(m=m, seed=0)},
        "FAVOR+": lambda m: {"features": fc.PositiveFeatures(m=m, seed=0), "balance": False},
    }
    print(f"{opts.run}: {opts.proteins} held-out proteins; relative error at m = {opts.m}")
    for i, (q, k, v) in sorted(seen.items()):
        exact = fc.softmax_attention(q, k, v, key_mask=mask)
        qn, kn = q.norm(dim=-1)[real[..., 0]], k.norm(dim=-1)[real[..., 0]]
        print(f"layer {i}: |q| mean {qn.mean():.1f} max {qn.max():.1f}; "
              f"|k| mean {kn.mean():.1f} max {kn.max():.1f}")  # fmt: skip
        for name, kwargs in maps.items():
            errs = []
            for m in opts.m:
                out = fc.favor_attention(q, k, v, key_mask=mask, query_mask=mask, **kwargs(m))
                errs.append(float((out - exact)[real.expand_as(out)].norm()
                                  / exact[real.expand_as(out)].norm()))  # fmt: skip
            print(f"  {name:8s} " + "  ".join(f"{e:.3f}" for e in errs))


if __name__ == "__main__":
    main()
