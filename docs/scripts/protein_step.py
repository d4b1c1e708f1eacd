"""The training step of ``favorcore protein``: FAVOR against exact attention, in one process.

Usage::

    python docs/scripts/protein_step.py [--repeats 5] [--profile] -- ARGS

``ARGS`` are the options of ``favorcore protein`` (the protein page's L = 8192 runs:
``--concat --length 8192 --batch-size 1 --d-model 256 --heads 4 --layers 4 --threads 2``);
``--attention`` and ``--out`` are ignored. It builds the command's data and model three
times: with FAVOR (the default estimator), with exact attention (SDPA), and with exact
attention whose every attention is replaced by its values (what the rest of the step
costs both). Each round takes the next training batch and runs the command's own
training step (BERT masking, forward, loss, backward, clipping, AdamW) on it with each
model in turn, alternating the order, so that drift and the batches affect them alike.
It prints the medians, the median of the rounds' exact/FAVOR ratios, and attention alone
(each step less the rest's); ``--profile`` adds PyTorch's profile of one FAVOR step.
Separate runs of the command are timed minutes apart; this comparison is not.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any


def main() -> None:
    import torch
    from favorcore_backends.protein import cli
    from favorcore_backends.protein.data import Batches

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    p.add_argument("args", nargs="*", help="favorcore protein's options (after --)")
    a = p.parse_args()
    args = cli._parser().parse_args([*a.args, "--out", tempfile.gettempdir()])
    if args.threads:
        torch.set_num_threads(args.threads)
    s = cli._setup(args)
    device = torch.device("cpu")
    models: dict[str, Any] = {}
    for att in ("favor", "exact", "values"):
        args.attention = "exact" if att == "values" else att
        torch.manual_seed(args.seed)
        models[att] = cli._model(args, len(s.tok))
    for layer in models["values"].layers:  # attention replaced by its values
        setattr(layer.attn, "_exact", lambda q, k, v, *rest: v)  # noqa: B010
    opts = {att: torch.optim.AdamW(m.parameters(), lr=args.lr) for att, m in models.items()}
    batches = Batches(s.train, args.batch_size, s.tok, args.seed)

    def step(att: str, batch: Any, k: int) -> None:
        cli.train_step(models[att], opts[att], batch, s, args, k, device)

    first = next(batches)
    for att in models:  # warm-up
        step(att, first, 0)
    times: dict[str, list[float]] = {att: [] for att in models}
    for r in range(a.repeats):
        batch = next(batches)
        for att in list(models) if r % 2 else list(models)[::-1]:
            t = time.perf_counter()
            step(att, batch, r + 1)
            times[att].append(time.perf_counter() - t)
    med = {att: statistics.median(ts) for att, ts in times.items()}
    ratio = statistics.median(e / f for e, f in zip(times["exact"], times["favor"], strict=True))
    rest = med["values"]
    fav, ex = med["favor"] - rest, med["exact"] - rest
    print(f"favorcore protein {' '.join(a.args)}: {a.repeats} rounds, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"training step: FAVOR {med['favor']:.2f} s, exact {med['exact']:.2f} s, "
          f"exact / FAVOR {ratio:.2f} (median of the rounds' ratios)")  # fmt: skip
    print(f"the rest of the step {rest:.2f} s; attention alone: FAVOR {fav:.2f} s, "
          f"exact {ex:.2f} s, exact / FAVOR {ex / fav:.2f}")  # fmt: skip
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step("favor", first, 0)
        table: Any = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print(table)


if __name__ == "__main__":
    main()
