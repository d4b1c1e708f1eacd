"""Protein data: FASTA, tokens, BERT masking, a held-out split, single and packed examples.

Plain Python and NumPy, except :func:`mask_tokens` and :class:`Batches` (PyTorch tensors).
No download at run time: the user passes FASTA paths, or :func:`default_fasta` finds the
bacterial proteome that ships inside the ``pyhmmer`` wheel as test data (2,100 proteins,
0.68 M residues).

A random split of one proteome leaves paralogs (related proteins of the same genome) on
both sides, so held-out figures are optimistic compared with a split by family or by
sequence identity.
"""

from __future__ import annotations

import gzip
import importlib.resources
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "AMBIGUOUS",
    "AMINO_ACIDS",
    "Batch",
    "Batches",
    "Example",
    "Tokenizer",
    "concatenated_examples",
    "default_fasta",
    "mask_tokens",
    "read_fasta",
    "single_examples",
    "split_proteins",
]

#: the 20 standard amino acids
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
#: ambiguity and rare codes: B (D/N), Z (E/Q), X (any), U (selenocysteine), O (pyrrolysine),
#: J (I/L)
AMBIGUOUS = "BZXUOJ"
#: the pyhmmer test file used by default, and the versions it was checked with
DEFAULT_FILE = "tests/data/seqs/938293.PRJEB85.HG003687.faa"
PYHMMER_RANGE = ">=0.10,<0.13"


def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """``(header, sequence)`` of every record of a FASTA file, plain or gzipped (recognised
    by its first bytes, whatever its name): letters are upper-cased, white space and
    alignment gaps (``-``, ``.``) removed, a trailing stop ``*`` dropped (one inside a
    sequence becomes X when tokenized).

    Raises
    ------
    ValueError
        If the file cannot be read as text FASTA: sequence data before the first header,
        a character that is neither a letter, a gap nor ``*`` (naming the record), a
        damaged gzip stream or bytes that are not text.
    OSError
        If the file is missing or is a directory.
    """
    p = Path(path)
    with open(p, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    records: list[tuple[str, str]] = []
    header: str | None = None
    parts: list[str] = []

    def finish() -> None:
        if header is not None:
            seq = "".join(parts).upper().rstrip("*")
            bad = sorted({c for c in seq if not (c.isascii() and c.isalpha()) and c != "*"})
            if bad:
                raise ValueError(
                    f"{p}: record {header.split()[0] if header else '(no name)'!r} holds "
                    f"{''.join(bad)!r}: expected amino-acid letters (gaps - and . and a stop "
                    "* are accepted)"
                )
            records.append((header, seq))

    try:
        with (
            gzip.open(p, "rt", encoding="utf-8-sig")
            if gzipped
            else open(p, encoding="utf-8-sig") as fh
        ):
            for line in fh:
                line = line.strip()
                if not line or line.startswith(";"):
                    continue
                if line.startswith(">"):
                    finish()
                    header, parts = line[1:].strip(), []
                elif header is None:
                    raise ValueError(f"{p}: sequence data before the first '>' header: not FASTA")
                else:
                    parts.append(line.translate(_DROP))
    except (EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise ValueError(f"{p}: not a readable FASTA file ({type(e).__name__}: {e})") from None
    finish()
    return records


#: characters removed from sequence lines: white space and alignment gaps
_DROP = str.maketrans("", "", " \t\r\n\v\f-.")


def default_fasta() -> Path:
    """The proteome bundled with ``pyhmmer`` (its test data), found with importlib.resources."""
    try:
        root = importlib.resources.files("pyhmmer")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "no FASTA given and pyhmmer is not installed: its wheel carries the default "
            "proteome. Install it (pip install '.[protein]' from a clone of favorcore, or "
            f"pip install 'pyhmmer{PYHMMER_RANGE}') or pass --fasta PATH"
        ) from None
    path = Path(str(root.joinpath(DEFAULT_FILE)))
    if not path.is_file():
        raise FileNotFoundError(
            f"pyhmmer is installed but has no {DEFAULT_FILE} (checked with pyhmmer"
            f"{PYHMMER_RANGE}); pass --fasta PATH"
        )
    return path


class Tokenizer:
    """Specials (pad 0, mask 1, cls/bos 2, eos/sep 3), the 20 amino acids, then B Z X U O J.

    Any other character (such as a ``*`` inside a sequence) becomes X. :func:`read_fasta`
    has already removed gaps and refused other characters that are not letters.
    """

    specials = ("<pad>", "<mask>", "<cls>", "<eos>")
    pad, mask, cls, eos = 0, 1, 2, 3

    def __init__(self) -> None:
        self.vocab = [*self.specials, *AMINO_ACIDS, *AMBIGUOUS]
        self.index = {c: i for i, c in enumerate(self.vocab)}
        self.unknown = self.index["X"]
        self.first_residue = len(self.specials)
        #: ids of the 20 standard amino acids (BERT's random replacements)
        self.standard = np.arange(self.first_residue, self.first_residue + len(AMINO_ACIDS))

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, seq: str, *, bos: bool = True, eos: bool = True) -> np.ndarray:
        ids = [self.index.get(c, self.unknown) for c in seq.upper()]
        return np.array(([self.cls] if bos else []) + ids + ([self.eos] if eos else []), np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] for i in ids if i >= self.first_residue)

    def is_residue(self, ids: Any) -> Any:
        """True where ``ids`` are residues (not specials): works on arrays and tensors."""
        return ids >= self.first_residue


def split_proteins(
    records: Sequence[tuple[str, str]], *, held_out: float = 0.1, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(train, held_out)``: a seeded random split by protein (see the module docstring on
    paralogs). At least one protein on each side when there are two or more."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    if len(records) < 2:
        raise ValueError("the split needs at least two proteins")
    order = np.random.default_rng(seed).permutation(len(records))
    n_test = min(max(1, round(held_out * len(records))), len(records) - 1)
    test = sorted(order[:n_test].tolist())
    keep = set(test)
    return [r for i, r in enumerate(records) if i not in keep], [records[i] for i in test]


@dataclass
class Example:
    """One sequence of tokens; in packed mode with boundaries, its ``segments`` (document
    ids from 0, for attention); packed or windowed, the ``documents`` its tokens come from
    (the proteins' indices in the list, for scoring by protein)."""

    tokens: np.ndarray
    segments: np.ndarray | None = None
    documents: np.ndarray | None = None


def single_examples(
    seqs: Sequence[str], tok: Tokenizer, length: int, *, window: bool = False
) -> list[Example]:
    """One example per protein, ``<cls> seq <eos>`` clipped to ``length`` tokens; with
    ``window``, each protein cut into consecutive windows of ``length`` tokens instead (the
    last one shorter; all residues are used)."""
    out: list[Example] = []
    for j, s in enumerate(seqs):
        ids = tok.encode(s)
        if not window:
            out.append(Example(ids[:length]))
        else:
            out.extend(
                Example(ids[i : i + length], None, np.full(len(ids[i : i + length]), j))
                for i in range(0, len(ids), length)
            )
    return out


def concatenated_examples(
    seqs: Sequence[str], tok: Tokenizer, length: int, *, segments: bool = True
) -> list[Example]:
    """Proteins ``<cls> seq <eos>`` one after another, cut into sequences of ``length``
    tokens (the last one shorter); with ``segments``, the document ids of every token
    (a protein cut by a boundary continues as a new document of the next sequence)."""
    stream = [tok.encode(s) for s in seqs]
    tokens = np.concatenate(stream) if stream else np.zeros(0, np.int64)
    ids = np.repeat(np.arange(len(stream)), [len(a) for a in stream])
    out = []
    for i in range(0, len(tokens), length):
        seg = ids[i : i + length]
        out.append(Example(tokens[i : i + length], (seg - seg[0]) if segments else None, seg))
    return out


def mask_tokens(
    tokens: Any, tok: Tokenizer, generator: Any, *, rate: float = 0.15
) -> tuple[Any, Any]:
    """BERT masking of a ``(N, L)`` tensor: each residue is selected with probability
    ``rate``; a selected one becomes ``<mask>`` (80 %), a random standard amino acid (10 %)
    or stays (10 %). Returns ``(inputs, targets)`` with targets -100 where not selected."""
    import torch

    residue = tok.is_residue(tokens)
    u = torch.rand(tokens.shape, generator=generator)
    selected = residue & (u < rate)
    how = torch.rand(tokens.shape, generator=generator)
    standard = torch.as_tensor(tok.standard)
    random = standard[torch.randint(0, len(standard), tokens.shape, generator=generator)]
    inputs = torch.where(selected & (how < 0.8), tok.mask, tokens)
    inputs = torch.where(selected & (how >= 0.8) & (how < 0.9), random, inputs)
    targets = torch.where(selected, tokens, -100)
    return inputs, targets


@dataclass
class Batch:
    """Padded ``tokens`` ``(N, L)``, ``key_mask`` (True = real) and optional ``segment_ids``."""

    tokens: Any
    key_mask: Any
    segment_ids: Any | None


def collate(examples: Sequence[Example], tok: Tokenizer) -> Batch:
    """Pad to the longest example (padding: ``<pad>``, a document id of its own)."""
    import torch

    n, length = len(examples), max(len(e.tokens) for e in examples)
    tokens = np.full((n, length), tok.pad, np.int64)
    keep = np.zeros((n, length), bool)
    ids = None if examples[0].segments is None else np.zeros((n, length), np.int64)
    for i, e in enumerate(examples):
        tokens[i, : len(e.tokens)], keep[i, : len(e.tokens)] = e.tokens, True
        if ids is not None:
            assert e.segments is not None
            ids[i, : len(e.tokens)] = e.segments
            ids[i, len(e.tokens) :] = (e.segments[-1] + 1) if len(e.tokens) else 0
    return Batch(
        torch.from_numpy(tokens),
        torch.from_numpy(keep),
        None if ids is None else torch.from_numpy(ids),
    )


class Batches:
    """Shuffled batches of training examples, epoch after epoch; its position
    (:meth:`state`) is two integers, so a resumed run continues with the same batches."""

    def __init__(self, examples: Sequence[Example], batch_size: int, tok: Tokenizer, seed: int):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.batch_size, self.tok, self.seed = examples, batch_size, tok, seed
        self.epoch, self.position = 0, 0
        self.per_epoch = math.ceil(len(examples) / batch_size)

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.position >= self.per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order()
        take = order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
        self.position += 1
        return collate([self.examples[i] for i in take], self.tok)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
