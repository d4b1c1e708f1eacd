"""Framework adapters for favorcore (PyTorch modules, JAX key-based draws, CuPy, Dask).

The core (:mod:`favorcore`) already runs on every Array API namespace; the adapters add
what only one framework can do. They arrive with the adapters issue; this import root
exists so that the distribution's layout is fixed from the start.
"""

__all__: list[str] = []
