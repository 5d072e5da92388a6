"""Shared fixtures. Multi-device tests run in subprocesses (the device count is fixed at JAX start-up)."""

import atexit
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One persistent XLA compilation cache per test session, set before JAX is imported: most of the suite's
# time is compiling, and many tests (and the `tsched.main` subprocesses they start, which inherit the
# environment) build the same programs from fresh closures. Identical programs then compile once. The
# xdist workers inherit the controller's directory; it starts empty, so a run measures a cold machine.
# The tests check what programs compute, not how fast: XLA's backend optimizations (LLVM -O0 instead of
# -O2) are off unless asked for (JAX_DISABLE_MOST_OPTIMIZATIONS=0), which cuts compile time by about a third.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The test requirements install libtpu (tsched.plan compiles for TPU slices ahead of time); without this,
# JAX would probe for a TPU at every start and print libtpu's warnings about the missing TPU environment.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="tsched-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


@pytest.fixture(scope="session")
def tiny_model_cfg():
    from tsched.model import ModelConfig

    return ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64)


@pytest.fixture(scope="session")
def tiny_params(tiny_model_cfg):
    import jax
    from tsched import model

    return model.init_params(tiny_model_cfg, jax.random.key(0))
