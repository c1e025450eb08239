"""Suite-wide settings: every test runs on CPU; compiled XLA programs are cached on disk so
engines built with the same shapes in one run (or a later run) do not compile twice."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "jaxserve-tests-xla-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
