"""The protein model's training step at one length: FAVOR against exact attention.

Usage: ``python docs/scripts/protein_step.py [--length 8192] [--repeats 3] [--profile]``.
It builds the masked-LM :class:`~favorcore_backends.models.PerformerLM` of the protein
page (``d_model`` 256, 4 heads of 64, 4 layers, MLP 1024, rotary positions) twice, with
FAVOR (the default estimator, m = 256) and with exact attention (SDPA), and times one
forward and backward step of each on one sequence of packed documents (protein-like
lengths, mean about 350), with the documents' boundaries (``segment_ids``) and without
them (attention across documents, as the papers' concatenated runs), the four cases
alternating so that drift affects them alike, and, with boundaries, the same model with
each attention replaced by its values (what the rest of the step costs both models). It
prints the medians, the exact/FAVOR ratios of the whole step and of attention alone (the
step less the rest); ``--profile`` adds PyTorch's profile of the FAVOR step with boundaries. The
optimiser and data pipeline of ``favorcore protein`` are left out: this is the model's
step alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def main() -> None:
    import numpy as np
    import torch
    from favorcore_backends.models import PerformerLM
    from favorcore_backends.models.performer import PerformerConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    lengths: list[int] = []
    while sum(lengths) < a.length:  # protein-like lengths: a gamma, mean about 350
        lengths.append(int(rng.gamma(2.0, 160.0)) + 30)
    ids = torch.tensor(np.repeat(np.arange(len(lengths)), lengths)[: a.length])[None]
    tokens = torch.randint(4, 29, (1, a.length))
    sizes: dict[str, Any] = {"vocab_size": 32, "d_model": 256, "n_heads": 4, "n_layers": 4,
                             "d_ff": 1024, "max_len": a.length}  # fmt: skip
    models = {
        att: PerformerLM(PerformerConfig(**sizes, attention=att)) for att in ("favor", "exact")
    }

    models["values"] = PerformerLM(PerformerConfig(**sizes, attention="exact"))
    for layer in models["values"].layers:  # attention replaced by its values
        setattr(layer.attn, "_exact", lambda q, k, v, *rest: v)  # noqa: B010

    def step(att: str, segments: bool) -> None:
        model = models[att]
        model.zero_grad()
        logits = model(tokens, segment_ids=ids if segments else None)
        logits.logsumexp(-1).mean().backward()

    cases = [(att, seg) for att in ("favor", "exact") for seg in (True, False)]
    cases.append(("values", True))
    for case in cases:  # warm-up
        step(*case)
    times: dict[tuple[str, bool], list[float]] = {case: [] for case in cases}
    for _ in range(a.repeats):
        for case in cases:
            t = time.perf_counter()
            step(*case)
            times[case].append(time.perf_counter() - t)
    med = {case: statistics.median(ts) for case, ts in times.items()}
    print(f"L = {a.length}, {len(lengths)} documents, {a.threads} threads")
    for seg in (True, False):
        what = "with boundaries   " if seg else "without boundaries"
        print(f"{what}: FAVOR {med['favor', seg]:.2f} s, exact {med['exact', seg]:.2f} s, "
              f"exact / FAVOR {med['exact', seg] / med['favor', seg]:.2f}")  # fmt: skip
    rest = med["values", True]
    fav, ex = med["favor", True] - rest, med["exact", True] - rest
    print(f"with boundaries, the rest of the step {rest:.2f} s; attention alone: FAVOR "
          f"{fav:.2f} s, exact {ex:.2f} s, exact / FAVOR {ex / fav:.2f}")  # fmt: skip
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step("favor", True)
        table: Any = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print(table)


if __name__ == "__main__":
    main()
