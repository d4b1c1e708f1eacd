"""Sessions: ``tests(numpy)``, ``tests(array_api_strict)``, ``lint``, ``demo``.

``nox`` with no arguments runs the test sessions and lint. Every session installs the
package non-editable (a built wheel), so the tests exercise the installed copy; the test
suite checks this when ``FAVORCORE_EXPECT_INSTALLED`` is set, as here.
"""

from __future__ import annotations

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
BACKENDS = ["numpy", "array_api_strict"]


def _install(session: nox.Session, *groups: str) -> None:
    """Install the package (non-editable) and the named PEP 735 dependency groups."""
    # The pip bundled with Python 3.11 (23.2) cannot read dependency groups, so nox reads
    # them from pyproject.toml and passes plain requirements.
    requirements = [r for g in groups for r in nox.project.dependency_groups(PYPROJECT, g)]
    session.install(".", *requirements)


@nox.session
@nox.parametrize("backend", BACKENDS, ids=BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """The conformance matrix on one backend, plus the doctests (on numpy)."""
    _install(session, "test")
    env = {"FAVORCORE_BACKENDS": backend, "FAVORCORE_EXPECT_INSTALLED": "1"}
    session.run("pytest", *session.posargs, env=env)
    if backend == "numpy" and not session.posargs:
        session.run(
            "pytest",
            "--doctest-modules",
            "--pyargs",
            "favorcore",
            "-p",
            "no:cacheprovider",
            env=env,
        )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (format and lint) and mypy."""
    _install(session, "lint")
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: ``favorcore demo`` on NumPy (pass options after ``--``)."""
    session.install(".")
    session.run("favorcore", "demo", *session.posargs)
