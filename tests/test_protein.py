"""favorcore_backends.protein: FASTA, tokens, masking, split, examples (tiny files)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from favorcore_backends.protein import data

FASTA = """>p1 first protein
MKTAYIAKQR
QISFVKSHFS*
>p2
ACDEFGHIKL
MNPQRSTVWY
; a comment
>p3 ambiguous
BZX-UO.J*A*
"""


@pytest.fixture
def fasta(tmp_path):
    path = tmp_path / "tiny.faa"
    path.write_text(FASTA)
    return path


def test_read_fasta(fasta, tmp_path):
    records = data.read_fasta(fasta)
    assert [h for h, _ in records] == ["p1 first protein", "p2", "p3 ambiguous"]
    assert records[0][1] == "MKTAYIAKQRQISFVKSHFS"
    assert records[1][1] == data.AMINO_ACIDS
    gz = tmp_path / "tiny.faa.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(FASTA)
    assert data.read_fasta(gz) == records
    unnamed = tmp_path / "gzipped.fa"  # recognised by its bytes, not its name
    unnamed.write_bytes(gz.read_bytes())
    assert data.read_fasta(unnamed) == records
    bom = tmp_path / "bom.faa"  # written by some Windows editors
    bom.write_text(FASTA, encoding="utf-8-sig")
    assert data.read_fasta(bom) == records
    assert records[2][1] == "BZXUOJ*A"  # gaps - and . removed, the final stop dropped
    bad = tmp_path / "bad.faa"
    bad.write_text("MKT\n>p\nA\n")
    with pytest.raises(ValueError, match="before the first"):
        data.read_fasta(bad)
    bad.write_text(">p1\nMKT\n>p2 x\nAC1D\n")
    with pytest.raises(ValueError, match="record 'p2' holds '1'"):
        data.read_fasta(bad)
    cut = tmp_path / "cut.faa.gz"
    cut.write_bytes(gz.read_bytes()[:-12])
    with pytest.raises(ValueError, match="not a readable FASTA"):
        data.read_fasta(cut)


def test_tokenizer(fasta):
    tok = data.Tokenizer()
    assert len(tok) == 4 + 20 + 6
    ids = tok.encode("ACY")
    assert ids[0] == tok.cls
    assert ids[-1] == tok.eos
    assert tok.decode(ids) == "ACY"
    amb = tok.encode(data.read_fasta(fasta)[2][1], bos=False, eos=False)
    assert tok.decode(amb) == "BZXUOJXA"  # gaps removed, a '*' inside a sequence is X
    assert tok.is_residue(amb).all()


def test_split_is_by_protein_and_seeded():
    records = [(f"p{i}", "ACDE" * (i + 1)) for i in range(20)]
    train, test = data.split_proteins(records, held_out=0.25, seed=1)
    assert len(test) == 5
    assert len(train) == 15
    assert not {h for h, _ in train} & {h for h, _ in test}
    assert data.split_proteins(records, held_out=0.25, seed=1) == (train, test)
    assert data.split_proteins(records, held_out=0.25, seed=2)[1] != test
    with pytest.raises(ValueError, match="two proteins"):
        data.split_proteins(records[:1])


def test_single_examples_clip_and_window():
    tok = data.Tokenizer()
    seqs = ["A" * 10, "C" * 3]
    clipped = data.single_examples(seqs, tok, 6)
    assert [len(e.tokens) for e in clipped] == [6, 5]
    assert clipped[0].tokens[0] == tok.cls
    windows = data.single_examples(seqs, tok, 6, window=True)
    assert [len(e.tokens) for e in windows] == [6, 6, 5]
    assert np.concatenate([e.tokens for e in windows[:2]]).tolist() == tok.encode(seqs[0]).tolist()


@pytest.mark.parametrize("segments", [True, False])
def test_concatenated_examples(segments):
    tok = data.Tokenizer()
    seqs = ["AAA", "CC", "DDDD"]  # 5 + 4 + 6 = 15 tokens
    ex = data.concatenated_examples(seqs, tok, 6, segments=segments)
    assert [len(e.tokens) for e in ex] == [6, 6, 3]
    stream = np.concatenate([tok.encode(s) for s in seqs])
    assert np.concatenate([e.tokens for e in ex]).tolist() == stream.tolist()
    if segments:
        assert [e.segments.tolist() for e in ex] == [[0] * 5 + [1], [0] * 3 + [1] * 3, [0] * 3]
    else:
        assert all(e.segments is None for e in ex)


def test_default_fasta_or_clear_error():
    try:
        import pyhmmer  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(ModuleNotFoundError, match="pyhmmer is not installed"):
            data.default_fasta()
        pytest.skip("pyhmmer is not installed: the default data is not there")
    records = data.read_fasta(data.default_fasta())
    assert len(records) > 2000
    assert sum(len(s) for _, s in records) > 600_000


def test_mask_tokens_80_10_10():
    torch = pytest.importorskip("torch", reason="masking makes torch tensors")
    tok = data.Tokenizer()
    g = torch.Generator().manual_seed(0)
    tokens = torch.as_tensor(tok.encode("ACDEFGHIKLMNPQRSTVWY" * 500))[None]
    inputs, targets = data.mask_tokens(tokens, tok, g)
    selected = targets != -100
    assert not selected[0, 0]
    assert not selected[0, -1]
    assert abs(float(selected.float().mean()) - 0.15) < 0.02
    assert torch.equal(targets[selected], tokens[selected])
    assert torch.equal(inputs[~selected], tokens[~selected])
    masked = float((inputs[selected] == tok.mask).float().mean())
    kept = float((inputs[selected] == tokens[selected]).float().mean())
    assert abs(masked - 0.8) < 0.04
    assert abs(kept - 0.1 - 0.1 / 20) < 0.03  # 10 % kept, plus random draws of the same
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(data.mask_tokens(tokens, tok, g2)[0], inputs)


def test_batches_resume_and_collate():
    pytest.importorskip("torch", reason="batches are torch tensors")
    tok = data.Tokenizer()
    ex = data.concatenated_examples(["AAA", "CC", "DDDD", "EEEEE"], tok, 6)
    a = data.Batches(ex, 2, tok, seed=0)
    first = [next(a).tokens.tolist() for _ in range(5)]
    b = data.Batches(ex, 2, tok, seed=0)
    for _ in range(2):
        next(b)
    c = data.Batches(ex, 2, tok, seed=0)
    c.load_state(b.state())
    assert [next(c).tokens.tolist() for _ in range(3)] == first[2:]
    batch = data.collate(ex, tok)
    assert batch.key_mask.sum().item() == sum(len(e.tokens) for e in ex)
    ids = batch.segment_ids
    assert (ids[:, 1:] >= ids[:, :-1]).all()  # padding is a document of its own, last
