"""``favorcore protein``: train and evaluate a protein language model (Performer or exact).

``favorcore protein --out DIR [options]`` trains a :class:`~favorcore_backends.models.PerformerLM`
on FASTA files (``--fasta``, repeatable; by default the proteome bundled with pyhmmer),
masked (``--mode mlm``) or autoregressive (``--mode causal``), on single proteins clipped
to ``--length`` or on proteins concatenated into sequences of ``--length`` (``--concat``),
and writes to ``DIR``: ``checkpoint.pt`` (model, optimiser, RNG, data position; loadable
with ``torch.load(..., weights_only=True)``; ``--resume`` continues it and reproduces an
uninterrupted run), ``metrics.json`` (held-out accuracy and perplexity with the count of
scored positions and a bootstrap interval, beside the unigram baseline) and
``learning_curve.png`` (when matplotlib is installed).

``favorcore protein convert --from DIR --out DIR2`` takes a trained model (typically
``--attention exact``), swaps every attention for FAVOR without training (several ``m``,
FAVOR++ with the balance and plain FAVOR+), evaluates each, then fine-tunes the FAVOR++
model briefly and writes ``conversion.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]


def _number(kind: type, test: Any, expected: str) -> Any:
    """An argparse type: ``kind(text)`` where ``test`` holds, else an error naming
    ``expected`` (argparse prefixes the option's name)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive = _number(int, lambda v: v > 0, "a positive integer")
_count = _number(int, lambda v: v >= 0, "a non-negative integer")
_rate = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_seconds = _number(float, lambda v: v > 0, "a positive number of seconds")
_fraction = _number(float, lambda v: 0 < v < 1, "a fraction strictly between 0 and 1")
_probability = _number(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")
_decay = _number(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number")


def _error(option: str, message: str, prog: str = "favorcore protein") -> SystemExit:
    """The exception that ends the command with ``message`` about ``option``."""
    return SystemExit(f"{prog}: error: argument {option}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="favorcore protein",
        description="Train and evaluate a protein language model (Performer or exact "
        "attention) on FASTA files (default: the proteome in pyhmmer's wheel); writes "
        "checkpoint.pt (resumable), metrics.json (held-out accuracy and perplexity beside "
        "the unigram baseline) and learning_curve.png. 'favorcore protein convert --help': "
        "swap a trained model's attention for FAVOR, evaluate, fine-tune.",
    )
    p.add_argument("--fasta", action="append", type=Path, help="FASTA file (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--steps", type=_positive, default=100, help="total training steps")
    p.add_argument("--mode", choices=["mlm", "causal"], default="mlm")
    p.add_argument("--attention", choices=["favor", "favor+", "exact"], default="favor",
                   help="favor: FAVOR++ with the balance (calibrated statistics when causal); "
                        "favor+: plain FAVOR+ (orthogonal, no balance); exact: SDPA")  # fmt: skip
    p.add_argument("--m", type=_positive, default=256, help="random features")
    p.add_argument("--model", choices=["performer", "bert"], default="performer",
                   help="performer: favorcore's PerformerLM (pre-norm, rotary or learned "
                        "positions); bert: Hugging Face BertForMaskedLM built from a config "
                        "(MLM on single proteins; needs transformers)")  # fmt: skip
    p.add_argument("--d-model", type=_positive, default=128)
    p.add_argument("--heads", type=_positive, default=4)
    p.add_argument("--layers", type=_positive, default=2)
    p.add_argument("--d-ff", type=_positive, default=None)
    p.add_argument("--positions", choices=["rotary", "learned"], default="rotary")
    p.add_argument("--dropout", type=_probability, default=0.0)
    p.add_argument("--length", type=_positive, default=512, help="tokens per sequence")
    p.add_argument("--concat", action="store_true", help="pack proteins into long sequences")
    p.add_argument("--no-segments", action="store_true",
                   help="with --concat: attend across protein boundaries")  # fmt: skip
    p.add_argument("--window", action="store_true",
                   help="single proteins: cut each into consecutive windows of --length "
                        "(the last one shorter; default: clip to --length)")  # fmt: skip
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--lr", type=_rate, default=1e-3)
    p.add_argument("--warmup", type=_count, default=50, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=_decay, default=0.01)
    p.add_argument("--held-out", type=_fraction, default=0.1,
                   help="fraction of proteins held out")  # fmt: skip
    p.add_argument("--eval-proteins", type=_count, default=200,
                   help="held-out proteins evaluated (0: all)")  # fmt: skip
    p.add_argument("--eval-every", type=_count, default=0,
                   help="steps between evaluations (0: at the end only)")  # fmt: skip
    p.add_argument("--calibrate-every", type=_count, default=0,
                   help="causal FAVOR: recalibrate the statistics every this many steps "
                        "(0: train with the map's causal form; evaluation is calibrated)")  # fmt: skip
    p.add_argument("--checkpoint-every", type=_count, default=0,
                   help="steps between checkpoints (0: at the end only)")  # fmt: skip
    p.add_argument("--budget-seconds", type=_seconds, default=None, help="wall-clock budget")
    p.add_argument("--resume", action="store_true",
                   help="continue DIR/checkpoint.pt, with the same settings (without a "
                        "checkpoint: start)")  # fmt: skip
    p.add_argument("--seed", type=_count, default=0)
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    return p


#: the options a resumed run may change: how long it runs, where, and how often it reports
RESUMABLE = frozenset({"steps", "budget_seconds", "resume", "threads", "device", "eval_every",
                       "checkpoint_every", "out"})  # fmt: skip


def _check(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` checked where argparse cannot (options wrong together, the model's shape,
    the minimal length, a usable --device and --out), with the FASTA paths made absolute
    so that a conversion run from another directory finds them."""
    if args.no_segments and not args.concat:
        raise _error("--no-segments", "needs --concat (it packs proteins without boundaries)")
    if args.window and args.concat:
        raise _error("--window", "is for single proteins: drop it, or drop --concat")
    if args.model == "bert" and (args.mode != "mlm" or args.concat):
        raise _error("--model", "bert is a masked LM of single proteins: use --mode mlm "
                     "without --concat")  # fmt: skip
    head_dim, rest = divmod(args.d_model, args.heads)
    if rest or head_dim % 2:
        raise _error("--d-model", f"{args.d_model} must be --heads ({args.heads}) times an "
                     "even head dimension")  # fmt: skip
    if args.length < 8:
        raise _error("--length", f"expected at least 8 tokens (<cls>, residues, <eos>), got "
                     f"{args.length}")  # fmt: skip
    _device(args.device)
    _usable_out(args.out)
    args.fasta = None if not args.fasta else [Path(f).expanduser().resolve() for f in args.fasta]
    return args


def _usable_out(out: Path, prog: str = "favorcore protein") -> None:
    """An error naming --out unless ``out`` is a directory or can become one (it is made
    when the first file is written, so a run that cannot start leaves nothing)."""
    for where in (out, *out.parents):
        if where.exists():
            if not where.is_dir():
                raise _error("--out", f"{where} is a file, not a directory", prog)
            if not os.access(where, os.W_OK):
                raise _error("--out", f"{where} is not writable", prog)
            return


def _device(name: str | None) -> Any:
    """The torch device ``name`` (default: CUDA when present), or an error naming --device."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise _error("--device", f"{name!r} is not a torch device (cpu, cuda, cuda:1, mps, "
                     "...)") from None  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _error("--device", f"{name!r}: this PyTorch sees no CUDA device (a CPU build, or "
                     "no GPU); use --device cpu")  # fmt: skip
    try:
        usable = device.type != "meta" and torch.zeros(1, device=device).item() == 0
    except (RuntimeError, AssertionError):  # (a CPU build asserts for some device types)
        usable = False
    if not usable:
        raise _error("--device", f"{name!r} cannot hold this run's tensors in this PyTorch; "
                     "use --device cpu")  # fmt: skip
    return device


# -- setup --------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    tok: Any
    train: list[Any]
    test: list[Any]
    data: dict[str, Any]
    unigram: np.ndarray


def _setup(args: argparse.Namespace) -> Setup:
    from . import data

    paths = args.fasta or [data.default_fasta()]
    records = [r for p in paths for r in _read(p)]
    if len(records) < 2:
        raise _error("--fasta", f"{len(records)} protein(s) in {', '.join(map(str, paths))}: "
                     "the held-out split needs at least two")  # fmt: skip
    train_rec, test_rec = data.split_proteins(records, held_out=args.held_out, seed=args.seed)
    held_out = len(test_rec)
    if args.eval_proteins:
        test_rec = test_rec[: args.eval_proteins]
    if len(test_rec) < 20:
        print(f"favorcore protein: note: {len(test_rec)} held-out protein(s) evaluated; "
              "intervals resampled from so few are rough", file=sys.stderr)  # fmt: skip
    tok = data.Tokenizer()
    seqs = [s for _, s in train_rec]
    held = [s for _, s in test_rec]
    if args.concat:
        segments = not args.no_segments
        train = data.concatenated_examples(seqs, tok, args.length, segments=segments)
        test = data.concatenated_examples(held, tok, args.length, segments=segments)
    else:
        train = data.single_examples(seqs, tok, args.length, window=args.window)
        test = data.single_examples(held, tok, args.length, window=args.window)
    counts = np.zeros(len(tok))
    for e in train:
        counts += np.bincount(e.tokens, minlength=len(tok))
    counts[: tok.first_residue] = 0
    unigram = (counts + 1.0) / (counts + 1.0)[tok.first_residue :].sum()
    unigram[: tok.first_residue] = 0.0

    def residues(examples: list[Any]) -> int:
        return int(sum(int(tok.is_residue(e.tokens).sum()) for e in examples))

    info = {
        "files": [str(p) for p in paths],
        "proteins": {"train": len(train_rec), "held_out": held_out, "evaluated": len(test_rec)},
        "residues": {"train": int(sum(map(len, seqs))), "evaluated": int(sum(map(len, held)))},
        # what the examples keep of them (clipping to --length drops the rest)
        "residues_in_examples": {"train": residues(train), "evaluated": residues(test)},
        "examples": {"train": len(train), "evaluated": len(test)},
        "split": f"random by protein (seed {args.seed}); paralogs of one proteome fall on "
        "both sides, so held-out figures are optimistic",
    }
    return Setup(tok, train, test, info, unigram)


def _read(path: Path) -> list[tuple[str, str]]:
    """The non-empty records of one ``--fasta`` file, or an error naming the option."""
    from . import data

    try:
        records = [r for r in data.read_fasta(path) if r[1]]
    except (OSError, ValueError) as e:
        raise _error("--fasta", str(e)) from None
    if not records:
        raise _error("--fasta", f"{path}: no sequence records (is it empty?)")
    letters = "".join(s for _, s in records)
    nucleotides = sum(letters.count(c) for c in "ACGTUN") / len(letters)
    if len(letters) >= 100 and nucleotides > 0.9:
        raise _error("--fasta", f"{path}: {nucleotides:.0%} of its letters are A C G T U N: "
                     "nucleotide sequences? favorcore protein reads protein FASTA "
                     "(translate them first)")  # fmt: skip
    return records


def _model(args: argparse.Namespace, vocab: int) -> Any:
    from favorcore_backends.models import PerformerConfig, PerformerLM

    if getattr(args, "model", "performer") == "bert":
        from .bert import BertConfigSpec, BertMLM, bert_to_favor
        from .data import Tokenizer

        spec = BertConfigSpec(
            vocab_size=vocab, pad_token_id=Tokenizer().pad, d_model=args.d_model,
            n_heads=args.heads, n_layers=args.layers, d_ff=args.d_ff, max_len=args.length,
            dropout=args.dropout,
        )  # fmt: skip
        bert = BertMLM(spec)
        if args.attention == "exact":
            return bert
        return bert_to_favor(bert, **_favor_kwargs(args.attention, args.m, args.seed))
    cfg = PerformerConfig(
        vocab_size=vocab, d_model=args.d_model, n_heads=args.heads, n_layers=args.layers,
        d_ff=args.d_ff, max_len=args.length, positions=args.positions,
        attention="exact" if args.attention == "exact" else "favor", dropout=args.dropout,
    )  # fmt: skip
    return PerformerLM(cfg, **_favor_kwargs(args.attention, args.m, args.seed))


def _favor_kwargs(attention: str, m: int, seed: int) -> dict[str, Any]:
    import favorcore

    if attention == "favor+":
        return {"features": favorcore.PositiveFeatures(m=m, seed=seed), "balance": False}
    if attention == "favor":
        return {"features": favorcore.OptimalPositiveFeatures(m=m, seed=seed), "balance": True}
    return {}


def _generator(*key: int) -> Any:
    """A torch generator seeded from ``key`` (training step ``(seed, 0, step)``, evaluation
    ``(seed, 1)``): masks depend on the step only, so a resumed run draws the same ones."""
    import torch

    return torch.Generator().manual_seed(
        int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    )


def _inputs_targets(batch: Any, mode: str, tok: Any, gen: Any, *, residues_only: bool) -> Any:
    """Model inputs and targets (-100: not scored) of a batch; targets aligned with logits."""
    import torch

    from .data import mask_tokens

    if mode == "mlm":
        return mask_tokens(batch.tokens, tok, gen)
    nxt = batch.tokens[:, 1:]
    keep = batch.key_mask[:, 1:] & batch.key_mask[:, :-1]
    if batch.segment_ids is not None:
        keep &= batch.segment_ids[:, 1:] == batch.segment_ids[:, :-1]
    if residues_only:
        keep &= tok.is_residue(nxt)
    targets = torch.full_like(batch.tokens, -100)
    targets[:, :-1] = torch.where(keep, nxt, -100)
    return batch.tokens, targets


def _forward(model: Any, inputs: Any, batch: Any, mode: str, device: Any) -> Any:
    """The model's logits; a batch with no padding passes no mask (the check reads the
    host's copy: an all-True mask would cost FAVOR masked passes in every layer)."""
    padded = not bool(batch.key_mask.all())
    return model(
        inputs.to(device), causal=mode == "causal",
        key_mask=batch.key_mask.to(device) if padded else None,
        segment_ids=None if batch.segment_ids is None else batch.segment_ids.to(device),
    )  # fmt: skip


# -- evaluation ---------------------------------------------------------------------------


def _bootstrap(
    per_example: np.ndarray, seed: int, draws: int = 1000
) -> tuple[list[float], list[float]]:
    """95 % intervals of accuracy and perplexity, resampling held-out examples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_example), (draws, len(per_example)))
    sums = per_example[idx].sum(axis=1)  # (draws, 3): correct, nll, count
    count = np.maximum(sums[:, 2], 1)
    acc, ppl = sums[:, 0] / count, np.exp(sums[:, 1] / count)
    return (np.percentile(acc, [2.5, 97.5]).tolist(), np.percentile(ppl, [2.5, 97.5]).tolist())


def _summary(per_example: np.ndarray, seed: int) -> dict[str, Any]:
    total = per_example.sum(axis=0)
    n = int(total[2])
    if not total[1] / max(n, 1) < 500:  # (exp overflows near 709; no model gets near 500)
        raise _error("--lr", f"the held-out cross-entropy is {total[1] / max(n, 1):.4g} nats: "
                     "the model diverged; lower --lr or lengthen --warmup")  # fmt: skip
    acc_ci, ppl_ci = _bootstrap(per_example, seed)
    return {
        "accuracy": float(total[0] / max(n, 1)),
        "perplexity": float(math.exp(total[1] / max(n, 1))),
        "cross_entropy": float(total[1] / max(n, 1)),
        "positions": n,
        "accuracy_ci95": acc_ci,
        "perplexity_ci95": ppl_ci,
    }


def evaluate(
    model: Any,
    s: Setup,
    args: argparse.Namespace,
    device: Any,
    *,
    keep: list[Any] | None = None,
    against: list[Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Held-out metrics of ``model`` and of the unigram baseline, on the same positions
    (MLM: the same masks for every model, from a fixed seed). ``keep``: a list that gets
    the log-probabilities at the scored positions, batch by batch; ``against``: such a
    list of another model, to which the metrics add ``kl_to_reference`` (the mean
    ``KL(reference || model)`` per scored position, nats) and ``agreement`` (the fraction
    of positions where the two models' top predictions agree)."""
    import torch
    import torch.nn.functional as F

    from .data import collate

    gen = _generator(args.seed, 1)
    log_uni = torch.as_tensor(np.log(np.where(s.unigram > 0, s.unigram, 1.0)))
    best_uni = int(np.argmax(s.unigram))
    # Scores are summed per held-out protein (the bootstrap's unit): a packed sequence holds
    # several proteins and a protein may span two sequences.
    rows: dict[int, list[float]] = {}
    uni_rows: dict[int, list[float]] = {}
    kl, agree = 0.0, 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b, i in enumerate(range(0, len(s.test), args.batch_size)):
            batch = collate(s.test[i : i + args.batch_size], s.tok)
            inputs, targets = _inputs_targets(batch, args.mode, s.tok, gen, residues_only=True)
            logits = _forward(model, inputs, batch, args.mode, device).float().cpu()
            scored = targets != -100
            logp = None
            if keep is not None or against is not None:
                logp = torch.log_softmax(logits[scored].double(), dim=-1)
            if keep is not None:
                keep.append(logp)
            if against is not None:
                assert logp is not None
                ref = against[b]
                kl += float((ref.exp() * (ref - logp)).sum())
                agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
            nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
            correct = (logits.argmax(-1) == targets) & scored
            uni_nll = -log_uni[targets.clamp(min=0)]
            for r in range(len(targets)):
                example = s.test[i + r]
                docs = torch.full((targets.shape[1],), -1, dtype=torch.long)
                if example.documents is None:  # one protein, clipped
                    docs[: len(example.tokens)] = i + r
                else:
                    docs[: len(example.tokens)] = torch.as_tensor(example.documents)
                for d in torch.unique(docs[scored[r]]).tolist():
                    sel = scored[r] & (docs == d)
                    for table, score in ((rows, [float((correct[r] & sel).sum()),
                                                 float(nll[r][sel].sum())]),
                                         (uni_rows, [float((targets[r][sel] == best_uni).sum()),
                                                     float(uni_nll[r][sel].sum())])):  # fmt: skip
                        total = table.setdefault(d, [0.0, 0.0, 0.0])
                        total[0] += score[0]
                        total[1] += score[1]
                        total[2] += float(sel.sum())
    model.train(was_training)
    if not rows:
        raise _error("--length", f"no held-out position was scored ({len(s.test)} held-out "
                     f"sequences of at most {args.length} tokens): raise --length or "
                     "--eval-proteins")  # fmt: skip
    metrics = _summary(np.array(list(rows.values())).reshape(-1, 3), args.seed)
    if against is not None:
        n = max(metrics["positions"], 1)
        metrics["kl_to_reference"], metrics["agreement"] = kl / n, agree / n
    return metrics, _summary(np.array(list(uni_rows.values())).reshape(-1, 3), args.seed)


def _calibration_batch(s: Setup, args: argparse.Namespace) -> Any:
    from .data import collate

    return collate(s.train[: max(args.batch_size, 8)], s.tok)


def evaluate_calibrated(
    model: Any, s: Setup, args: argparse.Namespace, device: Any, **kwargs: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`evaluate`; causal FAVOR models uncalibrated are calibrated on training data
    for the evaluation only."""
    if args.mode != "causal" or model.features is None or not model.attention_modules()[0].balance:
        return evaluate(model, s, args, device, **kwargs)
    if model.attention_modules()[0].statistics is not None:
        return evaluate(model, s, args, device, **kwargs)
    b = _calibration_batch(s, args)
    with model.calibrated(b.tokens.to(device), key_mask=b.key_mask.to(device),
                          segment_ids=None if b.segment_ids is None else b.segment_ids.to(device)):  # fmt: skip
        return evaluate(model, s, args, device, **kwargs)


# -- training -----------------------------------------------------------------------------


def _save(path: Path, payload: dict[str, Any]) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _peak_memory(device: Any) -> dict[str, Any]:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return {"cuda_max_allocated_bytes": int(torch.cuda.max_memory_allocated(device))}
    return {"max_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def _plot(out: Path, history: dict[str, Any], title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [h["step"] for h in history["train"]]
    a.plot(steps, [math.nan if h["loss"] is None else h["loss"] for h in history["train"]])
    a.set(xlabel="step", ylabel="training loss", title=title)
    if history["eval"]:
        b.plot([h["step"] for h in history["eval"]], [h["accuracy"] for h in history["eval"]], "o-")
    b.set(xlabel="step", ylabel="held-out accuracy")
    fig.tight_layout()
    path = out / "learning_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def train_step(
    model: Any, opt: Any, batch: Any, s: Setup, args: argparse.Namespace, step: int, device: Any
) -> Any:
    """One optimiser step of training (``step`` counts from 0: the masks and the learning
    rate's warm-up depend on it); returns the loss (a tensor), or None for a batch without
    a scored position (BERT's masking selected no residue), which makes no update."""
    import torch
    import torch.nn.functional as F

    inputs, targets = _inputs_targets(
        batch, args.mode, s.tok, _generator(args.seed, 0, step), residues_only=False
    )
    if not bool((targets != -100).any()):
        return None
    for group in opt.param_groups:
        group["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
    logits = _forward(model, inputs, batch, args.mode, device)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def train(
    args: argparse.Namespace,
    model: Any = None,
    s: Setup | None = None,
    *,
    log_name: str = "metrics.json",
) -> dict[str, Any]:
    """Train (or continue, ``args.resume``) and evaluate; returns the metrics written."""
    import torch

    from .data import Batches

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    ckpt = args.out / "checkpoint.pt"
    saved = _resumed(ckpt, args, device)
    torch.manual_seed(args.seed)
    s = _setup(args) if s is None else s
    model = (_model(args, len(s.tok)) if model is None else model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    batches = Batches(s.train, args.batch_size, s.tok, args.seed)
    step, elapsed = 0, 0.0
    history: dict[str, Any] = {"train": [], "eval": []}
    if saved is not None:
        model.load_state_dict(saved["model"])
        model.load_favor_state(saved["favor"])
        opt.load_state_dict(saved["optimizer"])
        batches.load_state(saved["data"])
        torch.set_rng_state(saved["rng"])
        step, elapsed, history = int(saved["step"]), float(saved["elapsed"]), saved["history"]
        if step > args.steps:
            raise _error("--steps", f"{ckpt} is at step {step}, past --steps {args.steps}: "
                         "give the total number of steps, more than it has done")  # fmt: skip
    kept = [step] if saved is not None else []  # the steps of the checkpoints written

    def diverged(why: str) -> SystemExit:
        where = (f"the checkpoint of step {kept[-1]} is kept" if kept else
                 "no checkpoint was written: --checkpoint-every N keeps one")  # fmt: skip
        return _error("--lr", f"training diverged after {step} steps ({why}) with --lr "
                      f"{args.lr}: lower it or lengthen --warmup ({where})")  # fmt: skip

    def checkpoint() -> None:
        kept.append(step)
        _save(ckpt, {
            "model": model.state_dict(), "favor": model.favor_state(),
            "optimizer": opt.state_dict(), "data": batches.state(), "rng": torch.get_rng_state(),
            "step": step, "elapsed": elapsed, "history": history,
            "config": model.config.to_dict(), "args": _args_dict(args),
        })  # fmt: skip

    progress = None
    if sys.stderr.isatty():
        from favorcore.cli import Progress

        progress = Progress(args.steps, "favorcore protein")
        progress.done = step
    calibrates = (args.mode == "causal" and args.calibrate_every and model.features is not None
                  and model.attention_modules()[0].balance)  # fmt: skip
    start = time.monotonic() - elapsed
    model.train()
    stopped = "steps"
    with _linalg_failure_as(diverged):  # (FAVOR++'s balance of diverged activations)
        while step < args.steps:
            if args.budget_seconds is not None and time.monotonic() - start >= args.budget_seconds:
                stopped = "budget"
                break
            batch = next(batches)
            if calibrates and step % args.calibrate_every == 0:
                model.calibrate(batch.tokens.to(device), key_mask=batch.key_mask.to(device),
                                segment_ids=None if batch.segment_ids is None
                                else batch.segment_ids.to(device))  # fmt: skip
            loss = train_step(model, opt, batch, s, args, step, device)
            value = None if loss is None else loss.item()
            if value is not None and not math.isfinite(value):
                raise diverged(f"loss {value}")
            step += 1
            elapsed = time.monotonic() - start
            history["train"].append({"step": step, "loss": value, "seconds": elapsed})
            if progress is not None:
                progress.advance("no scored position" if value is None else f"loss {value:.3f}")
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                paused = time.monotonic()
                metrics, _ = evaluate_calibrated(model, s, args, device)
                history["eval"].append({"step": step, "seconds": elapsed, **metrics})
                start += time.monotonic() - paused  # (training time excludes evaluations)
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                checkpoint()
        final, unigram = evaluate_calibrated(model, s, args, device)
    if not history["eval"] or history["eval"][-1]["step"] != step:
        history["eval"].append({"step": step, "seconds": elapsed, **final})
    checkpoint()
    trained = history["train"]
    per_step = (trained[-1]["seconds"] / len(trained)) if trained else None
    times = np.diff([0.0] + [h["seconds"] for h in trained])
    median_step = float(np.median(times)) if len(times) else None
    result = {
        "command": ["favorcore", "protein", *getattr(args, "argv", [])],
        "mode": args.mode, "attention": args.attention, "steps": step, "stopped": stopped,
        "train_seconds": elapsed, "seconds_per_step": per_step, "median_step_seconds": median_step, "device": str(device),
        "threads": torch.get_num_threads(), "memory": _peak_memory(device),
        "config": model.config.to_dict(), "args": _args_dict(args), "data": s.data,
        "metric": "masked-residue" if args.mode == "mlm" else "next-residue",
        "held_out": final, "unigram": unigram, "history": history,
    }  # fmt: skip
    result["plot"] = _plot(args.out, history, f"{args.mode}, {args.attention}")
    (args.out / log_name).write_text(json.dumps(result, indent=1, allow_nan=False))
    return result


@contextlib.contextmanager
def _linalg_failure_as(error: Any) -> Iterator[None]:
    """Raise ``error(reason)`` for a linear-algebra failure inside (the eigendecomposition
    of FAVOR++'s balance fails on the non-finite activations of a diverged model)."""
    import torch

    try:
        yield
    except torch.linalg.LinAlgError as e:  # type: ignore[attr-defined]
        raise error(str(e).split("\n")[0]) from None


def _load(path: Path, option: str, device: Any, prog: str = "favorcore protein") -> dict[str, Any]:
    """A checkpoint of this command (``weights_only``), or an error naming ``option``."""
    import pickle
    import zipfile

    import torch

    if not zipfile.is_zipfile(path):  # (torch.save writes a zip archive)
        raise _error(option, f"{path} is not a checkpoint of favorcore protein", prog)
    try:
        saved = torch.load(path, weights_only=True, map_location=device)
    except (OSError, EOFError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
        reason = f"{type(e).__name__}: {e}".split("\n")[0]
        raise _error(option, f"{path} cannot be read ({reason})", prog) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("args"), dict):
        raise _error(option, f"{path} is not a checkpoint of favorcore protein", prog)
    return saved


def _as_option(name: str, value: Any) -> str:
    """``value`` of the setting ``name`` as it is written on the command line."""
    flag = "--" + name.replace("_", "-")
    if value is True:
        return flag
    if value is False or value is None:
        return f"no {flag}"
    if isinstance(value, list):
        return " ".join(f"{flag} {v}" for v in value)
    return f"{flag} {value}"


def _resumed(ckpt: Path, args: argparse.Namespace, device: Any) -> dict[str, Any] | None:
    """The checkpoint that ``--resume`` continues (None: a new run), after checking that
    every setting a result depends on is the one it was saved with."""
    if not args.resume:
        if ckpt.exists():
            raise _error("--out", f"{args.out} already holds a run ({ckpt.name}): continue it "
                         "with --resume, or choose another --out")  # fmt: skip
        return None
    if not ckpt.exists():
        print(f"favorcore protein: note: no {ckpt}: starting a new run", file=sys.stderr)
        return None
    saved = _load(ckpt, "--resume", device)
    now, then = _args_dict(args), saved["args"]
    changed = sorted(k for k in now.keys() | then.keys()
                     if k not in RESUMABLE and now.get(k) != then.get(k))  # fmt: skip
    if changed:
        what = "; ".join(f"saved with {_as_option(k, then.get(k))}, now {_as_option(k, now.get(k))}"
                         for k in changed)  # fmt: skip
        raise _error("--resume", f"{ckpt} was made with other settings ({what}): a resumed "
                     "run keeps them; rerun with the saved ones, or choose another --out")  # fmt: skip
    return saved


def _args_dict(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list)
                else v) for k, v in vars(args).items() if k != "argv"}  # fmt: skip


# -- conversion ---------------------------------------------------------------------------


def convert(argv: Sequence[str]) -> dict[str, Any]:
    """Exact (or any) trained model -> FAVOR without training, evaluated; then fine-tuned."""
    import torch

    from favorcore_backends.models import PerformerLM, exact_to_favor
    from favorcore_backends.models.performer import PerformerConfig

    p = argparse.ArgumentParser(prog="favorcore protein convert")
    p.add_argument("--from", dest="source", type=Path, required=True, help="a training DIR")
    p.add_argument("--out", type=Path, required=True, help="a new directory")
    p.add_argument("--fasta", action="append", type=Path,
                   help="the source run's FASTA files, where they have moved (default: the "
                        "paths it saved)")  # fmt: skip
    p.add_argument("--m", type=_positive, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--steps", type=_count, default=100, help="fine-tuning steps (0: none)")
    p.add_argument("--fine-tune-m", type=_positive, default=256)
    p.add_argument("--eval-every", type=_count, default=20,
                   help="fine-tuning steps between evaluations (0: at the end only)")  # fmt: skip
    p.add_argument("--lr", type=_rate, default=None, help="default: the source run's")
    p.add_argument("--threads", type=_positive, default=None)
    p.add_argument("--device", default=None)
    opts = p.parse_args(list(argv))
    prog = "favorcore protein convert"
    source_ckpt = opts.source if opts.source.is_file() else opts.source / "checkpoint.pt"
    if not source_ckpt.is_file():
        what = "holds no checkpoint.pt" if opts.source.exists() else "does not exist"
        raise _error("--from", f"{opts.source} {what}: pass the --out directory of a "
                     "finished 'favorcore protein' run", prog)  # fmt: skip
    for name in ("checkpoint.pt", "conversion.json"):
        if (opts.out / name).exists():
            raise _error("--out", f"{opts.out} already holds a run ({name}): choose a new "
                         "directory", prog)  # fmt: skip
    _usable_out(opts.out, prog)
    _device(opts.device)
    saved = _load(source_ckpt, "--from", "cpu", prog)
    args = argparse.Namespace(**saved["args"])
    args.device = opts.device  # (not the source's: it may have trained elsewhere)
    if opts.fasta:
        args.fasta = [str(f.expanduser().resolve()) for f in opts.fasta]
    if args.attention != "exact":
        print(f"favorcore protein convert: note: {opts.source} was trained with "
              f"--attention {args.attention}; its attention is swapped for new draws",
              file=sys.stderr)  # fmt: skip
    args.fasta = [Path(f) for f in args.fasta] if args.fasta else None
    args.out, args.resume, args.budget_seconds = opts.out, False, None
    args.threads = opts.threads or args.threads
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    s = _setup(args)
    swap: Any = exact_to_favor
    if getattr(args, "model", "performer") == "bert":
        from .bert import bert_to_favor

        source, swap = _model(args, saved["config"]["vocab_size"]), bert_to_favor
    else:
        source = PerformerLM(
            PerformerConfig(**saved["config"]), **_favor_kwargs(args.attention, args.m, args.seed)
        )
    source.load_state_dict(saved["model"])
    source.load_favor_state(saved["favor"])
    source.to(device)
    reference: list[Any] = []
    base, _unigram = evaluate_calibrated(source, s, args, device, keep=reference)
    rows = []
    for attention in ("favor", "favor+"):
        for m in opts.m:
            new = swap(source, **_favor_kwargs(attention, m, args.seed))
            metrics, _ = evaluate_calibrated(new, s, args, device, against=reference)
            rows.append({"attention": attention, "m": m, **metrics,
                         "accuracy_drop": base["accuracy"] - metrics["accuracy"]})  # fmt: skip
    if _compares_performer_pytorch(args, source):
        for m in opts.m:
            new = _performer_pytorch(source, m, args.seed)
            metrics, _ = evaluate_calibrated(new, s, args, device, against=reference)
            rows.append({"attention": "performer-pytorch", "m": m, **metrics,
                         "accuracy_drop": base["accuracy"] - metrics["accuracy"]})  # fmt: skip
    result: dict[str, Any] = {
        "source": str(source_ckpt.parent), "source_attention": args.attention, "mode": args.mode,
        "source_metrics": base, "unigram": _unigram, "converted": rows,
    }  # fmt: skip
    opts.out.mkdir(parents=True, exist_ok=True)
    if opts.steps:
        tuned = swap(source, **_favor_kwargs("favor", opts.fine_tune_m, args.seed))
        args.steps, args.eval_every, args.attention, args.m = (
            opts.steps,
            opts.eval_every,
            "favor",
            opts.fine_tune_m,
        )
        args.warmup = 0
        if opts.lr is not None:
            args.lr = opts.lr
        args.argv = ["convert", *argv]
        fine = train(args, tuned, s, log_name="fine_tune.json")
        result["fine_tune"] = {"m": opts.fine_tune_m, "curve": fine["history"]["eval"],
                               "final": fine["held_out"]}  # fmt: skip
    (opts.out / "conversion.json").write_text(json.dumps(result, indent=1))
    return result


def _compares_performer_pytorch(args: argparse.Namespace, source: Any) -> bool:
    """Whether a conversion adds performer-pytorch's rows: a masked PerformerLM trained with
    exact attention on batches without documents' boundaries, and performer-pytorch
    installed."""
    import importlib.util

    return (args.mode == "mlm" and getattr(args, "model", "performer") == "performer"
            and source.features is None and not (args.concat and not args.no_segments)
            and importlib.util.find_spec("performer_pytorch") is not None)  # fmt: skip


def _performer_pytorch(source: Any, m: int, seed: int) -> Any:
    """A copy of the exact model ``source`` whose attention is performer-pytorch's
    ``FastAttention`` (FAVOR+ with its own orthogonal draw of ``m`` features per layer,
    seeded), masked as performer-pytorch's ``SelfAttention`` masks padding: the padded
    keys' values are zeroed, their features stay in the normaliser. Bidirectional
    attention without ``segment_ids`` only."""
    import copy
    import warnings

    import torch

    with warnings.catch_warnings():  # (its import compares versions with distutils')
        warnings.simplefilter("ignore", DeprecationWarning)
        from performer_pytorch import FastAttention

    model = copy.deepcopy(source)
    where = next(source.parameters()).device
    for layer, attn in enumerate(model.attention_modules()):
        with torch.random.fork_rng(devices=[]):  # (its draw uses torch's global generator)
            torch.manual_seed(int(np.random.SeedSequence([seed, layer]).generate_state(1)[0]))
            fast = FastAttention(attn.head_dim, nb_features=m).to(where)
        attn.add_module("performer_pytorch", fast)
        setattr(attn, "_exact", functools.partial(_performer_pytorch_attention, fast))  # noqa: B010
    return model


def _performer_pytorch_attention(
    fast: Any, q: Any, k: Any, v: Any, causal: bool, key_mask: Any, segment_ids: Any
) -> Any:
    if causal or segment_ids is not None:
        raise ValueError(
            "the performer-pytorch comparison runs bidirectional attention without "
            "segment_ids only (masked models of single proteins)"
        )
    if key_mask is not None:
        v = v.masked_fill(~key_mask[:, None, :, None], 0.0)
    return fast(q, k, v)


def main(argv: Sequence[str] | None = None) -> int:
    """``favorcore protein [convert] ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    ckpt = None
    try:
        try:
            import torch  # noqa: F401
        except ModuleNotFoundError:
            raise SystemExit(
                "favorcore protein needs PyTorch: pip install '.[protein]' (from a clone of "
                "favorcore)"
            ) from None
        if argv[:1] == ["convert"]:
            result = convert(argv[1:])
            print(json.dumps({"source": result["source_metrics"],
                              "converted": result["converted"]}, indent=1))  # fmt: skip
            return 0
        args = _check(_parser().parse_args(argv))
        args.argv, ckpt = argv, args.out / "checkpoint.pt"
        result = train(args)
    except KeyboardInterrupt:
        hint = ""
        if ckpt is not None:
            hint = (f"; {ckpt} continues with --resume" if ckpt.exists() else
                    "; no checkpoint was written (--checkpoint-every N keeps one)")  # fmt: skip
        print(f"\nfavorcore protein: interrupted{hint}", file=sys.stderr)
        return 130
    print(
        json.dumps(
            {k: result[k] for k in ("steps", "stopped", "seconds_per_step", "held_out", "unigram")},
            indent=1,
        )
    )
    return 0
