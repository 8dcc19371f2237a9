"""Shared pytest fixtures.

Runtime type checking: ``pyproject.toml`` passes ``--jaxtyping-packages=eqdisp,analysis,beartype.beartype``,
so every jaxtyping annotation in the library is checked while the tests run. Import library modules
inside tests or fixtures, not at the top of this file, so the import hook can instrument them.
"""

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
