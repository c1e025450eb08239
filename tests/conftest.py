"""Suite-wide settings: every test runs on CPU; compiled XLA programs are cached on disk so
engines built with the same shapes in one run (or a later run) do not compile twice."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Through the environment, so the checks the tests run in subprocesses (8 fake devices, two
# processes, a served model) share the cache too.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxserve-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The tests check what our programs compute, not how fast LLVM's code runs: XLA:CPU's backend at
# optimization level 0 compiles in about 3/4 of the time (tests/models/test_hf_parity.py from a
# cold cache: 44 s instead of 59 s). Scripts and the server keep XLA's default. Set
# JAXSERVE_TESTS_XLA_OPT=default to test with it.
if os.environ.get("JAXSERVE_TESTS_XLA_OPT", "0") != "default" and "xla_backend_optimization_level" not in \
        os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops jax's in-memory caches of compiled programs after each test module (the disk cache
    above keeps them for later engines). Every CPU executable holds its own mappings of JIT code,
    and a whole suite in one process otherwise keeps hundreds of programs alive."""
    yield
    gc.collect()
    jax.clear_caches()
