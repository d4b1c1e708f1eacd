"""The tests run against the installed package, and its command line works."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import example_id, python_blocks, run_example

import favorcore
from favorcore import cli

SOURCE = Path(__file__).resolve().parents[1] / "favorcore"


@pytest.mark.skipif(
    not os.environ.get("FAVORCORE_EXPECT_INSTALLED"),
    reason="only under nox, which installs a built wheel (a dev checkout may be editable)",
)
def test_imports_the_installed_copy_not_the_source_folder() -> None:
    here = Path(favorcore.__file__).resolve()
    assert not here.is_relative_to(SOURCE), here
    assert "site-packages" in here.parts


def test_demo_prints_the_table() -> None:
    out = io.StringIO()
    rows = cli.demo([64, 96], heads=2, d=16, m=32, repeats=1, poor_case=False, out=out)
    text = out.getvalue()
    assert "error" in text
    assert "uniform" in text
    assert len(rows) == 6
    assert {r["mode"] for r in rows} == {"bidirectional", "causal", "causal, no stats"}
    for r in rows:
        assert 0 < r["rel_error"] < 1.5  # FAVOR++ at m=32 is rough, but not garbage
        assert r["favor_s"] > 0
        assert r["exact_s"] > 0
        assert f"{r['L']:>6} {r['mode']:<17} {r['rel_error']:>7.3f}" in text


def test_command_line_runs_as_a_module() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "favorcore",
            "demo",
            "--lengths",
            "32",
            "--heads",
            "1",
            "--d",
            "8",
            "--m",
            "16",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "bidirectional" in done.stdout
    assert "causal" in done.stdout
    assert "A poor case" in done.stdout
    assert done.stderr == ""  # no progress bar into a pipe (tests/test_cli.py: on a terminal)


def test_command_line_rejects_bad_options() -> None:
    with pytest.raises(SystemExit):
        cli.main(["demo", "--lengths", "0"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--norm", "-1"])


@pytest.mark.parametrize("code", python_blocks("README.md"), ids=example_id)
def test_readme_examples_run(code: str) -> None:
    run_example(code)
