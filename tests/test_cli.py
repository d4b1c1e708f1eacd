"""The command line: plain-text help, ``--version``, errors through argparse (exit 2, no
traceback), the demo's table and poor cases, and no progress frames off a terminal."""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys

import pytest

from favorcore import cli

SMALL = ["--lengths", "48", "--heads", "1", "--d", "8", "--m", "16", "--repeats", "1"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "favorcore", *args], capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["chunks", "--help"]])
def test_help_is_plain_text_and_documents_every_option(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text
    assert ":func:" not in text
    assert ":data:" not in text
    assert "usage: favorcore" in text


def test_every_option_has_help() -> None:
    parser = cli._build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, p in [("favorcore", parser), *sub.choices.items()]:
        if name in cli.DELEGATED:
            continue  # they parse (and document) their own options
        bare = [a.dest for a in p._actions if a.option_strings and not a.help]
        assert not bare, (name, bare)


def test_top_level_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for name in ("demo", "chunks", *cli.DELEGATED):
        assert re.search(rf"^    {name}\s", text, flags=re.MULTILINE), name
    assert "OptimalPositiveFeatures(m=256, seed=0)" in text  # the default, named once


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"favorcore {cli.version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", cli.version())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--m", "0"], "argument --m: expected a positive"),
        (["demo", "--m", "abc"], "argument --m: expected a positive"),
        (["demo", "--m", "7"], "even"),
        (["demo", "--lengths", "0"], "argument --lengths"),
        (["demo", "--norm", "-1"], "argument --norm"),
        (["demo", "--noise", "nan"], "argument --noise"),
        (["demo", "--heads", "1.5"], "argument --heads"),
        (["chunks", "--sizes", "0"], "argument --sizes"),
        (["nonsense"], "invalid choice"),
        ([], "required: command"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_bad_argument_in_a_process_has_no_traceback() -> None:
    done = _run("demo", "--m", "0")
    assert done.returncode == 2
    assert "error: argument --m" in done.stderr
    assert "Traceback" not in done.stderr


def test_progress_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    quiet, tty = io.StringIO(), Tty()
    for stream in (quiet, tty):
        bar = cli.Progress(2, "x", stream=stream)
        bar.advance("a")
        bar.advance()
    assert quiet.getvalue() == ""
    assert "\r" in tty.getvalue()
    assert tty.getvalue().endswith("\n")
    assert "2/2" in tty.getvalue()


def test_demo_in_a_pipe_writes_no_carriage_return() -> None:
    done = _run("demo", *SMALL, "--no-poor-case")
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout + done.stderr
    assert done.stderr == ""
    assert "bidirectional" in done.stdout
    assert "causal, no stats" in done.stdout


def test_demo_table_defines_the_error_and_prints_the_baseline() -> None:
    out = io.StringIO()
    rows = cli.demo([64, 96], heads=2, d=16, m=32, repeats=1, poor_case=False, out=out)
    text = out.getvalue()
    assert "|out - exact|_F / |exact|_F" in text
    assert "uniform" in text
    assert "entropy" in text
    assert "exact ms" in text
    assert len(rows) == 6
    assert {r["mode"] for r in rows} == {"bidirectional", "causal", "causal, no stats"}
    for r in rows:
        assert 0 < r["rel_error"] < r["uniform_error"]  # FAVOR beats averaging the values
        assert r["uniform_error"] >= 0.5  # the inputs are far from uniform attention
        assert 0 < r["entropy_fraction"] < 1
        assert r["favor_s"] > 0
        assert r["exact_s"] > 0
        assert f"{r['L']:>6} {r['mode']:<17} {r['rel_error']:>7.3f}" in text


def test_demo_shows_what_estimate_error_flags() -> None:
    out = io.StringIO()
    cli.demo([32], heads=1, d=16, m=32, repeats=1, out=out)
    text = out.getvalue()
    assert text.count("A poor case") == 2
    assert "suggested m =" in text  # the first one: more features reach the target
    assert "no m up to" in text  # the second: they do not
    assert text.count("what to do:") == 2
    assert "smaller" in text
    assert "QK-norm" in text
