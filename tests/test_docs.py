"""Every Python example of the docs runs (so that none can go stale)."""

from __future__ import annotations

import pytest
from helpers import example_id, python_blocks, run_example

EXAMPLES = [
    (page, code)
    for page in (
        "docs/getting-started.md",
        "docs/robustness.md",
        "docs/kernel-features.md",
        "docs/training.md",
    )
    for code in python_blocks(page)
]


@pytest.mark.parametrize(
    ("page", "code"), EXAMPLES, ids=[f"{p.split('/')[-1]}-{example_id(c)}" for p, c in EXAMPLES]
)
def test_docs_example_runs(page: str, code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # an example may set SCIPY_ARRAY_API (scikit-learn's array API dispatch needs it):
    # restore the environment afterwards
    monkeypatch.delenv("SCIPY_ARRAY_API", raising=False)
    run_example(code)
