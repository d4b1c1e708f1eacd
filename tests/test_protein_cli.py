"""``favorcore protein``: a tiny training run, resumption, metrics, conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="favorcore protein needs torch")

from favorcore_backends.protein import AMINO_ACIDS
from favorcore_backends.protein.cli import main

from favorcore.cli import main as favorcore_main

TINY = ["--d-model", "16", "--heads", "2", "--layers", "1", "--m", "16", "--length", "24",
        "--batch-size", "4", "--threads", "1", "--warmup", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("fasta") / "tiny.faa"
    letters = np.array(list(AMINO_ACIDS))
    path.write_text("".join(
        f">p{i}\n{''.join(rng.choice(letters, rng.integers(8, 40)))}\n" for i in range(30)
    ))  # fmt: skip
    return path


def _run(fasta, out, *extra):
    assert main(["--fasta", str(fasta), "--out", str(out), *TINY, *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def _has_peer():
    import importlib.util

    return importlib.util.find_spec("performer_pytorch") is not None


def _state(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize(
    "extra",
    [
        ("--mode", "mlm"),
        ("--mode", "causal", "--concat", "--calibrate-every", "2"),
        ("--mode", "mlm", "--attention", "exact", "--concat", "--no-segments"),
    ],
)
def test_resumed_run_reproduces_uninterrupted(fasta, tmp_path, extra, capsys):
    whole = _run(fasta, tmp_path / "a", "--steps", "6", *extra)
    _run(fasta, tmp_path / "b", "--steps", "3", *extra)
    resumed = _run(fasta, tmp_path / "b", "--steps", "6", "--resume", *extra)
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["data"] == b["data"]
    assert [h["loss"] for h in whole["history"]["train"]] == [
        h["loss"] for h in resumed["history"]["train"]
    ]
    assert whole["held_out"] == resumed["held_out"]
    capsys.readouterr()


def test_metrics_json(fasta, tmp_path, capsys):
    m = _run(fasta, tmp_path, "--steps", "2", "--mode", "causal")
    for key in ("held_out", "unigram"):
        r = m[key]
        assert r["positions"] > 0
        assert 0 <= r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1] <= 1
        assert r["perplexity"] == pytest.approx(np.exp(r["cross_entropy"]))
    assert m["held_out"]["positions"] == m["unigram"]["positions"]
    assert m["unigram"]["perplexity"] < 21  # residue frequencies beat uniform (20 letters)
    assert m["data"]["proteins"] == {"train": 27, "held_out": 3, "evaluated": 3}
    kept = m["data"]["residues_in_examples"]
    assert kept["evaluated"] == m["held_out"]["positions"]  # each kept residue is a target
    assert kept["train"] <= m["data"]["residues"]["train"]
    assert "paralogs" in m["data"]["split"]
    assert (tmp_path / "learning_curve.png").exists() == (m["plot"] is not None)
    assert json.loads(capsys.readouterr().out)["steps"] == 2


def test_budget_stops_and_checkpoints(fasta, tmp_path, capsys):
    m = _run(fasta, tmp_path, "--steps", "50", "--budget-seconds", "1e-9")
    assert (m["steps"], m["stopped"]) == (0, "budget")
    assert _state(tmp_path)["step"] == 0
    capsys.readouterr()


def test_convert_exact_to_favor(fasta, tmp_path, capsys):
    _run(fasta, tmp_path / "exact", "--steps", "3", "--attention", "exact")
    out = tmp_path / "conv"
    argv = ["convert", "--from", str(tmp_path / "exact"), "--out", str(out), "--m", "16", "32",
            "--steps", "2", "--eval-every", "1"]  # fmt: skip
    assert favorcore_main(["protein", *argv]) == 0
    result = json.loads((out / "conversion.json").read_text())
    peers = [("performer-pytorch", 16), ("performer-pytorch", 32)] if _has_peer() else []
    assert [(r["attention"], r["m"]) for r in result["converted"]] == [
        ("favor", 16),
        ("favor", 32),
        ("favor+", 16),
        ("favor+", 32),
        *peers,
    ]
    assert [p["step"] for p in result["fine_tune"]["curve"]] == [1, 2]
    assert result["source_metrics"]["positions"] == result["converted"][0]["positions"]
    for r in result["converted"]:
        assert r["kl_to_reference"] >= 0
        assert 0 <= r["agreement"] <= 1
    capsys.readouterr()


def test_agreement_of_a_model_with_itself(fasta, tmp_path):
    from favorcore_backends.protein import cli

    args = cli._parser().parse_args(["--fasta", str(fasta), "--out", str(tmp_path), *TINY])
    s = cli._setup(args)
    model = cli._model(args, len(s.tok))
    ref: list = []
    first, _ = cli.evaluate(model, s, args, "cpu", keep=ref)
    again, _ = cli.evaluate(model, s, args, "cpu", against=ref)
    assert again["kl_to_reference"] == pytest.approx(0.0, abs=1e-12)
    assert again["agreement"] == 1.0
    assert sum(len(r) for r in ref) == first["positions"]
    other = cli._model(cli._parser().parse_args(
        ["--fasta", str(fasta), "--out", str(tmp_path), *TINY, "--seed", "1"]), len(s.tok))  # fmt: skip
    differs, _ = cli.evaluate(other, s, args, "cpu", against=ref)
    # two differently initialised models: KL(p || q) from the log-probabilities directly
    want = sum(
        float((r.exp() * (r - q)).sum()) for r, q in zip(ref, _logp(other, s, args), strict=True)
    )
    assert differs["kl_to_reference"] == pytest.approx(want / first["positions"], rel=1e-9)
    assert differs["kl_to_reference"] > 0


def _message(argv, capsys):
    """The message a bad invocation ends with (argparse prints its own, then exits 2)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err


def _bad_files(tmp_path):
    files = {
        "empty": "",
        "not FASTA": "MKTAYIAK\n",
        "digits": ">p1\nMKT\n>p2\nAC9D\n",
        "one protein": ">p1\nMKTAYIAK\n",
        "nucleotides": ">n1\n" + "ACGT" * 40 + "\n",
    }
    tmp_path.mkdir()
    for name, text in files.items():
        (tmp_path / f"{name}.fa").write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("extra", "option", "expected"),
    [
        (["--fasta", "{tmp}/missing.fa"], "--fasta", "No such file"),
        (["--fasta", "{tmp}"], "--fasta", "directory"),
        (["--fasta", "{tmp}/empty.fa"], "--fasta", "no sequence records"),
        (["--fasta", "{tmp}/not FASTA.fa"], "--fasta", "before the first"),
        (["--fasta", "{tmp}/digits.fa"], "--fasta", "record 'p2' holds '9'"),
        (["--fasta", "{tmp}/one protein.fa"], "--fasta", "at least two"),
        (["--fasta", "{tmp}/nucleotides.fa"], "--fasta", "nucleotide"),
        (["--no-segments"], "--no-segments", "needs --concat"),
        (["--window", "--concat"], "--window", "single proteins"),
        (["--model", "bert", "--mode", "causal"], "--model", "masked LM"),
        (["--d-model", "16", "--heads", "3"], "--d-model", "even head dimension"),
        (["--length", "4"], "--length", "at least 8"),
        (["--held-out", "1"], "--held-out", "strictly between 0 and 1"),
        (["--held-out", "0"], "--held-out", "strictly between 0 and 1"),
        (["--eval-proteins", "-1"], "--eval-proteins", "non-negative"),
        (["--eval-every", "-1"], "--eval-every", "non-negative"),
        (["--calibrate-every", "-1"], "--calibrate-every", "non-negative"),
        (["--checkpoint-every", "-1"], "--checkpoint-every", "non-negative"),
        (["--warmup", "-5"], "--warmup", "non-negative"),
        (["--seed", "-1"], "--seed", "non-negative"),
        (["--lr", "-1"], "--lr", "positive"),
        (["--lr", "nan"], "--lr", "positive"),
        (["--weight-decay", "-1"], "--weight-decay", "non-negative"),
        (["--dropout", "2"], "--dropout", "probability"),
        (["--budget-seconds", "0"], "--budget-seconds", "positive"),
        (["--device", "tpu9"], "--device", "not a torch device"),
        (["--device", "meta"], "--device", "cannot hold"),
        (["--out", "{tmp}/empty.fa"], "--out", "is a file"),
        (["--out", "{tmp}/empty.fa/run"], "--out", "is a file"),
    ],
)
def test_cli_errors_name_the_argument(fasta, tmp_path, capsys, extra, option, expected):
    files = _bad_files(tmp_path / "files")
    out = tmp_path / "out"
    given = [] if "--fasta" in extra else ["--fasta", str(fasta)]
    argv = [*given, "--out", str(out), *TINY, "--steps", "1"]
    message = _message([*argv, *(a.replace("{tmp}", str(files)) for a in extra)], capsys)
    assert f"argument {option}" in message
    assert expected in message
    assert not out.exists()  # nothing is written for a run that cannot start


def test_cuda_device_without_cuda(fasta, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this PyTorch sees a CUDA device: the refusal cannot be shown")
    message = _message(["--fasta", str(fasta), "--out", str(tmp_path / "o"), "--device", "cuda"],
                       capsys)  # fmt: skip
    assert "argument --device" in message
    assert "no CUDA device" in message


def test_a_run_is_neither_overwritten_nor_resumed_with_other_settings(fasta, tmp_path, capsys):
    out = tmp_path / "run"
    _run(fasta, out, "--steps", "2")
    before = _state(out)["model"]
    message = _message(["--fasta", str(fasta), "--out", str(out), *TINY, "--steps", "2"], capsys)
    assert "argument --out" in message
    assert "--resume" in message
    for changed in (["--attention", "favor+"], ["--m", "32"], ["--mode", "causal"],
                    ["--concat"], ["--seed", "3"], ["--lr", "0.1"]):  # fmt: skip
        argv = ["--fasta", str(fasta), "--out", str(out), *TINY, *changed, "--resume"]
        message = _message([*argv, "--steps", "4"], capsys)
        assert "argument --resume" in message
        assert f"now {' '.join(changed)})" in message or f"now {' '.join(changed)};" in message
    for name, tensor in before.items():  # untouched
        assert torch.equal(tensor, _state(out)["model"][name])
    # what a resumed run may change: how long it runs and how often it reports
    m = _run(fasta, out, "--steps", "3", "--resume", "--eval-every", "1", "--threads", "1")
    assert m["steps"] == 3
    capsys.readouterr()
    _run(fasta, tmp_path / "new", "--steps", "1", "--resume")  # no checkpoint: a new run
    assert "starting a new run" in capsys.readouterr().err


def test_convert_refuses_a_missing_source_and_a_used_out(fasta, tmp_path, capsys):
    _run(fasta, tmp_path / "exact", "--steps", "1", "--attention", "exact")
    for source, out, option in ((tmp_path / "nothing", tmp_path / "c1", "--from"),
                                (tmp_path / "exact", tmp_path / "exact", "--out")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(["convert", "--from", str(source), "--out", str(out), "--m", "16"])
        assert f"argument {option}" in str(e.value.code)
    (tmp_path / "junk").mkdir()
    junk = tmp_path / "junk" / "checkpoint.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"argument --from: .* is not a checkpoint"):
        main(["convert", "--from", str(junk), "--out", str(tmp_path / "c2")])
    whole = (tmp_path / "exact" / "checkpoint.pt").read_bytes()
    junk.write_bytes(whole[: len(whole) // 2] + whole[-4096:])  # a zip with damaged members
    with pytest.raises(SystemExit, match=r"argument --from: .* cannot be read"):
        main(["convert", "--from", str(junk), "--out", str(tmp_path / "c2")])
    assert not (tmp_path / "c2").exists()
    capsys.readouterr()


def test_convert_reads_moved_fasta_files_from_its_own_option(fasta, tmp_path, capsys):
    moved = tmp_path / "data" / "tiny.faa"
    moved.parent.mkdir()
    moved.write_bytes(fasta.read_bytes())
    main(["--fasta", str(moved), "--out", str(tmp_path / "exact"), *TINY, "--steps", "1",
          "--attention", "exact"])  # fmt: skip
    moved.rename(tmp_path / "data" / "elsewhere.faa")
    argv = ["convert", "--from", str(tmp_path / "exact"), "--m", "16", "--steps", "0"]
    with pytest.raises(SystemExit, match=r"argument --fasta: .*tiny\.faa"):
        main([*argv, "--out", str(tmp_path / "c1")])
    main(
        [*argv, "--out", str(tmp_path / "c1"), "--fasta", str(tmp_path / "data" / "elsewhere.faa")]
    )
    assert (tmp_path / "c1" / "conversion.json").exists()
    with pytest.raises(SystemExit, match=r"argument --out: .*conversion\.json"):
        main([*argv, "--out", str(tmp_path / "c1")])  # a conversion is not overwritten
    capsys.readouterr()


def test_batches_without_a_scored_position_make_no_update(fasta, tmp_path, capsys):
    # L = 8, one protein a batch: BERT's 15 % often selects none of the 6 residues
    m = _run(fasta, tmp_path, "--steps", "12", "--length", "8", "--batch-size", "1")
    text = (tmp_path / "metrics.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    losses = [h["loss"] for h in m["history"]["train"]]
    assert None in losses
    assert all(loss is None or np.isfinite(loss) for loss in losses)
    capsys.readouterr()


def test_a_diverging_run_stops_with_a_message(fasta, tmp_path, monkeypatch, capsys):
    from favorcore_backends.protein import cli

    monkeypatch.setattr(cli, "train_step", lambda *a: torch.tensor(float("nan")))
    argv = ["--fasta", str(fasta), "--out", str(tmp_path), *TINY, "--steps", "3"]
    message = _message(argv, capsys)
    assert "argument --lr: training diverged after 0 steps (loss nan)" in message

    def failed(*a):  # what FAVOR++'s balance meets in the activations of a diverged model
        raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")

    monkeypatch.setattr(cli, "train_step", failed)
    message = _message(argv, capsys)
    assert "argument --lr: training diverged after 0 steps (linalg.eigh" in message
    assert not tmp_path.joinpath("checkpoint.pt").exists()


def test_evaluation_without_a_scored_position_says_so(fasta, tmp_path):
    from favorcore_backends.protein import cli
    from favorcore_backends.protein.data import Example

    args = cli._parser().parse_args(["--fasta", str(fasta), "--out", str(tmp_path), *TINY])
    s = cli._setup(args)
    s.test = [Example(np.array([s.tok.cls, s.tok.eos]))]  # no residue to score
    with pytest.raises(SystemExit, match="argument --length: no held-out position"):
        cli.evaluate(cli._model(args, len(s.tok)), s, args, "cpu")


def test_interrupt_ends_with_a_hint(fasta, tmp_path, monkeypatch, capsys):
    from favorcore_backends.protein import cli

    real = cli.train_step

    def interrupted(*a):
        if a[5] == 2:  # (the step)
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(cli, "train_step", interrupted)
    argv = ["--fasta", str(fasta), *TINY, "--steps", "5"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 130
    assert "no checkpoint was written (--checkpoint-every" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "b"), "--checkpoint-every", "1"]) == 130
    assert "checkpoint.pt continues with --resume" in capsys.readouterr().err
    assert _state(tmp_path / "b")["step"] == 2


def test_a_resumed_run_needs_more_steps_than_it_has(fasta, tmp_path, capsys):
    _run(fasta, tmp_path, "--steps", "3")
    message = _message(["--fasta", str(fasta), "--out", str(tmp_path), *TINY, "--steps", "2",
                        "--resume"], capsys)  # fmt: skip
    assert "argument --steps" in message
    assert "at step 3" in message


def test_a_diverged_evaluation_is_refused():
    from favorcore_backends.protein import cli

    with pytest.raises(SystemExit, match="argument --lr: the held-out cross-entropy"):
        cli._summary(np.array([[0.0, 800.0, 1.0]]), 0)  # (exp(800) overflows)


def test_bert_trains_and_converts(fasta, tmp_path, capsys):
    pytest.importorskip("transformers", reason="--model bert needs transformers")
    m = _run(fasta, tmp_path / "bert", "--steps", "3", "--model", "bert", "--attention", "exact")
    assert m["steps"] == 3
    assert m["config"]["kind"] == "bert"
    out = tmp_path / "conv"
    argv = ["convert", "--from", str(tmp_path / "bert"), "--out", str(out), "--m", "16",
            "--steps", "2", "--eval-every", "1"]  # fmt: skip
    assert favorcore_main(["protein", *argv]) == 0
    result = json.loads((out / "conversion.json").read_text())
    assert [(r["attention"], r["m"]) for r in result["converted"]] == [
        ("favor", 16),
        ("favor+", 16),
    ]
    assert [p["step"] for p in result["fine_tune"]["curve"]] == [1, 2]
    capsys.readouterr()


def test_bert_to_favor_keeps_weights_and_approximates_exact():
    pytest.importorskip("transformers", reason="--model bert needs transformers")
    from favorcore_backends.protein.bert import BertConfigSpec, BertMLM, bert_to_favor

    import favorcore as fc

    torch.manual_seed(0)
    exact = BertMLM(BertConfigSpec(vocab_size=30, pad_token_id=0, d_model=32, n_heads=2,
                                   n_layers=2, max_len=40)).eval()  # fmt: skip
    with torch.no_grad():  # sharper attention than at initialisation
        for name, p in exact.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.mul_(3.0)
    favor = bert_to_favor(exact, features=fc.OptimalPositiveFeatures(m=4096, seed=0))
    assert favor.bert.config._attn_implementation != exact.bert.config._attn_implementation
    for (name, a), b in zip(exact.state_dict().items(), favor.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    tokens = torch.randint(4, 30, (2, 40), generator=torch.Generator().manual_seed(1))
    key_mask = torch.ones(2, 40, dtype=torch.bool)
    key_mask[1, 25:] = False
    with torch.no_grad():
        want = exact(tokens, key_mask=key_mask)
        got = favor(tokens, key_mask=key_mask)
        other = bert_to_favor(exact, features=fc.OptimalPositiveFeatures(m=4096, seed=1))(
            tokens, key_mask=key_mask
        )
    # FAVOR's error at m = 4096 is about 2e-5 of the logits' scale here (two independent
    # draws alike), while attending to the padding would change them by about 3e-3.
    scale = want[key_mask].std()
    assert (got - want)[key_mask].abs().max() < 3e-4 * scale
    assert (other - want)[key_mask].abs().max() < 3e-4 * scale
    with torch.no_grad():
        assert (exact(tokens) - want)[key_mask].abs().max() > 3e-4 * scale
    assert not torch.equal(got, other)
    with pytest.raises(ValueError, match="--mode mlm"):
        exact(tokens, causal=True)


def _logp(model, s, args):
    from favorcore_backends.protein import cli

    out: list = []
    cli.evaluate(model, s, args, "cpu", keep=out)
    return out


def test_forward_masks_padding_only_where_a_batch_has_some():
    """A padded batch's real rows equal each protein's logits alone (the mask reaches the
    model); a batch without padding passes no mask and equals the model with an all-True
    mask (float64, so the two paths agree to rounding)."""
    from favorcore_backends.models import PerformerConfig, PerformerLM
    from favorcore_backends.protein.cli import _forward
    from favorcore_backends.protein.data import Tokenizer, collate, single_examples

    import favorcore

    tok = Tokenizer()
    torch.manual_seed(0)
    cfg = PerformerConfig(vocab_size=len(tok), d_model=16, n_heads=2, n_layers=1)
    model = PerformerLM(cfg, features=favorcore.OptimalPositiveFeatures(m=16, seed=0)).double()
    seen = []  # the key_mask each forward receives
    inner = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("key_mask"))
        return inner(*args, **kwargs)

    model.forward = spy
    short, long = single_examples(["MKV", "ACDEFGHIKL"], tok, 24)
    padded = collate([short, long], tok)
    assert not bool(padded.key_mask.all())
    got = _forward(model, padded.tokens, padded, "mlm", torch.device("cpu"))
    assert seen[-1] is not None
    n = len(short.tokens)
    alone = model(torch.as_tensor(short.tokens)[None])
    torch.testing.assert_close(got[0, :n], alone[0], rtol=1e-10, atol=1e-12)
    whole = collate([long], tok)
    assert bool(whole.key_mask.all())
    got = _forward(model, whole.tokens, whole, "mlm", torch.device("cpu"))
    assert seen[-1] is None
    masked = model(whole.tokens, key_mask=whole.key_mask)
    torch.testing.assert_close(got, masked, rtol=1e-10, atol=1e-12)


def test_performer_pytorch_attention_masks_padding_as_performer_pytorch():
    """The conversion's performer-pytorch rows: its FastAttention estimates softmax
    attention whose normaliser keeps the padded keys (their values zeroed), as its
    SelfAttention computes; float64, m = 16384, |q| |k| / sqrt(d) about 1, where its
    largest error was 0.035-0.049 over five seeds (bound 0.1), while the answer that
    leaves padding out differed by 0.35 or more on the padded row."""
    if not _has_peer():
        pytest.skip("the comparison needs performer-pytorch")
    import math
    import warnings

    from favorcore_backends.protein.cli import _performer_pytorch_attention

    with warnings.catch_warnings():  # (its import compares versions with distutils')
        warnings.simplefilter("ignore", DeprecationWarning)
        from performer_pytorch import FastAttention

    torch.manual_seed(0)
    fast = FastAttention(16, nb_features=16384).double()
    q, k = (0.5 * torch.randn(2, 2, 12, 16, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 2, 12, 16, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    got = _performer_pytorch_attention(fast, q, k, v, False, mask, None)
    scores = q @ k.mT / 4
    theirs = torch.softmax(scores, -1) @ (v * mask[:, None, :, None])
    without = torch.softmax(scores.masked_fill(~mask[:, None, None, :], -math.inf), -1) @ v
    assert (got - theirs).abs().max() < 0.1
    assert (got[1] - without[1]).abs().max() > 0.25
    with pytest.raises(ValueError, match="bidirectional attention without segment_ids"):
        _performer_pytorch_attention(fast, q, k, v, True, None, None)


def test_performer_pytorch_copy_replaces_every_attention_and_keeps_the_source():
    """``_performer_pytorch``: a copy whose logits differ from the exact source's (its
    attention is an estimate) but stay near them (m = 4096 at initialisation, whose
    attention is nearly uniform: 4e-4 at most here, against logits up to 0.25; bound 1e-2); the
    source and torch's global generator are left as they were."""
    if not _has_peer():
        pytest.skip("the comparison needs performer-pytorch")
    from favorcore_backends.models import PerformerConfig, PerformerLM
    from favorcore_backends.protein.cli import _performer_pytorch

    torch.manual_seed(0)
    cfg = PerformerConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=2, attention="exact")
    source = PerformerLM(cfg).double().eval()
    tokens = torch.randint(4, 29, (2, 20))
    with torch.no_grad():
        before = source(tokens)
        rng = torch.get_rng_state()
        copy = _performer_pytorch(source, 4096, 0)
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(hasattr(a, "performer_pytorch") for a in copy.attention_modules())
        assert len(copy.attention_modules()) == 2
        got = copy(tokens)
        assert torch.equal(source(tokens), before)
    assert not torch.equal(got, before)
    assert (got - before).abs().max() < 1e-2


def test_report_update_replaces_only_the_rerun_runs(fasta, tmp_path, capsys):
    """``protein_report.py --update``: a rerun replaces its namesakes, the rest is kept."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "docs" / "scripts" / "protein_report.py"
    spec = importlib.util.spec_from_file_location("protein_report", script)
    assert spec is not None
    assert spec.loader is not None
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    first, second = tmp_path / "first", tmp_path / "second"
    for name in ("L1024-mlm-favor", "L1024-mlm-exact"):
        _run(fasta, first / name, "--steps", "2", "--eval-every", "1",
             "--attention", name.rsplit("-", 1)[1])  # fmt: skip
    _run(fasta, second / "L1024-mlm-exact", "--steps", "3", "--eval-every", "1",
         "--attention", "exact", "--seed", "1")  # fmt: skip
    old, new = report.collect(first), report.collect(second)
    merged = report.update(old, new)
    assert set(merged["runs"]) == {"L1024-mlm-favor", "L1024-mlm-exact"}
    assert merged["runs"]["L1024-mlm-favor"] == old["runs"]["L1024-mlm-favor"]
    assert merged["runs"]["L1024-mlm-exact"]["steps"] == 3
    # The equal-step comparison is recomputed from the merged curves: the last common step.
    assert [e["step"] for e in merged["equal_steps"]] == [2]
    rerun = report._score(new["curves"]["L1024-mlm-exact"][1])
    assert rerun != old["equal_steps"][0]["exact"]
    assert merged["equal_steps"][0]["exact"] == rerun
    assert merged["equal_steps"][0]["favor"] == old["equal_steps"][0]["favor"]
    capsys.readouterr()


@pytest.mark.parametrize(
    "layout",
    [("--concat", "--length", "96"), ("--concat", "--length", "96", "--no-segments"),
     ("--window", "--length", "16")],
)  # fmt: skip
def test_evaluation_bootstraps_over_proteins(fasta, tmp_path, monkeypatch, layout):
    """A packed sequence holds several proteins and windows cut one: the bootstrap resamples
    proteins, not sequences (two packed sequences would make a meaningless interval)."""
    from favorcore_backends.protein import cli

    argv = ["--fasta", str(fasta), "--out", str(tmp_path), *TINY, "--mode", "causal", *layout]
    args = cli._parser().parse_args(argv)
    s = cli._setup(args)
    seen: list[np.ndarray] = []
    real = cli._bootstrap
    monkeypatch.setattr(cli, "_bootstrap", lambda rows, seed: seen.append(rows) or real(rows, seed))
    metrics, unigram = cli.evaluate(cli._model(args, len(s.tok)), s, args, "cpu")
    proteins = {int(d) for e in s.test for d in np.asarray(e.documents)}
    assert len(s.test) != len(proteins)
    for rows, summary in zip(seen, (metrics, unigram), strict=True):
        assert rows.shape == (len(proteins), 3)
        assert rows[:, 2].sum() == summary["positions"]
        assert rows[:, 0].sum() / rows[:, 2].sum() == pytest.approx(summary["accuracy"])
