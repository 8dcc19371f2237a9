"""Shared pytest fixtures.

Runtime type checking: ``pyproject.toml`` passes ``--jaxtyping-packages=eqdisp,analysis,beartype.beartype``,
so every jaxtyping annotation in the library is checked while the tests run. Import library modules
inside tests or fixtures, not at the top of this file, so the import hook can instrument them.
"""

import gc

import jax
import pytest

# Implicit dtype promotion hides bf16/f32 mix-ups; the library must be explicit.
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    """A function returning a fresh PRNG key on every call, deterministic within a test."""
    key = jax.random.key(0)

    def _getkey():
        nonlocal key
        key, subkey = jax.random.split(key)
        return subkey

    return _getkey


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free every compiled program after each test file.

    XLA:CPU maps the code of each compiled kernel into its own memory regions, and jax keeps every
    program it compiled for the life of the process. The whole suite in one process compiles
    enough to pass Linux's default limit of 65,530 mappings per process (``vm.max_map_count``),
    and the compiler then crashes (a segfault or abort in whichever test compiles next).
    """
    yield
    jax.clear_caches()
    gc.collect()
