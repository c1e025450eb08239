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
# The tests check what our programs compute, not how fast LLVM's code runs, and most of the suite's
# time is XLA:CPU compiling small programs. So the suite compiles them the cheap way: the backend at
# optimization level 0, XLA:CPU's classic elemental emitters instead of its MLIR fusion emitters,
# one LLVM module per program and no expensive LLVM passes. tests/models/test_hf_parity.py from a
# cold cache: 48 s of compiling at -O0 alone, 14.5 s with all four (66.6 s -> 30.6 s of wall time).
# Scripts and the server keep XLA's defaults; set JAXSERVE_TESTS_XLA_OPT=default to test with them.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                  "--xla_cpu_parallel_codegen_split_count=1", "--xla_llvm_disable_expensive_passes=true")
# Under pytest-xdist (make test: one worker per core) every process computes on one thread: XLA:CPU's
# Eigen pool and torch's OpenMP pool (the oracles) otherwise each start a thread per core and the
# workers' threads contend for the same two cores. The test models are tiny, so a second thread buys
# little even alone: sliding window's admission test (1024 steps then) took 12.8 s single-threaded, not 20.7.
# (Threads are about contention, not optimization: JAXSERVE_TESTS_XLA_OPT=default keeps this.)
flags = TEST_XLA_FLAGS if os.environ.get("JAXSERVE_TESTS_XLA_OPT", "0") != "default" else ()
if os.environ.get("PYTEST_XDIST_WORKER"):
    flags += ("--xla_cpu_multi_thread_eigen=false",)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
given = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([given, *(f for f in flags if f.split("=")[0] not in given)]).strip()  # outside wins

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _subprocesses_without_torch():
    """The processes the tests start run without torch (tests/no_torch/sitecustomize.py), unless
    they set PYTHONPATH themselves (the *_check.py scripts hide it in their first lines). Set in
    the process that runs the tests, so the pytest-xdist workers themselves, started earlier, keep
    torch for their oracles."""
    here = os.path.join(os.path.dirname(__file__), "no_torch")
    given = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = here if not given else os.pathsep.join([here, given])
    yield
    if given is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = given


# jax's in-memory caches are dropped after a test module once the process holds more than this.
CLEAR_CACHES_ABOVE_BYTES = 4 << 30


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None  # not Linux: clear after every module


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops jax's in-memory caches of traced, lowered and compiled programs after a test module
    once the process holds more than CLEAR_CACHES_ABOVE_BYTES (the disk cache above keeps the
    compiled ones for later engines). Every CPU executable holds its own mappings of JIT code, and
    a whole suite in one process otherwise keeps hundreds of programs alive; clearing after every
    module instead made later modules trace and lower again what earlier ones had (the loader's
    and the kernels' shared jits, eager ops): 9 model and engine files in one process took 101-106 s
    that way, 95-101 s keeping the caches (1.4 GB against 2.8 GB at their peak).

    What survives a module (imported code, session fixtures, kept caches) is then frozen out of the
    collector's view, so the next module's collection walks only the objects made since: a full
    collection over torch's, transformers' and jax's objects took about 0.7 s per module, 90
    modules over. Before a clear, the frozen objects are unfrozen so the programs they hold in
    reference cycles can be collected too."""
    yield
    gc.collect()
    rss = _resident_bytes()
    if rss is None or rss > CLEAR_CACHES_ABOVE_BYTES:
        gc.unfreeze()
        jax.clear_caches()
        gc.collect()
    gc.freeze()


# make test's workers (pytest-xdist, --dist loadfile) take the next whole file when they finish one,
# in collection order (make passes --no-loadscope-reorder; xdist otherwise starts with the files that
# hold the most tests, so one-test files of 15-20 s came last: the workers once ended 19 s apart). These
# take 20-90 s each on 2 cores (a fresh venv, engines on 8 fake devices, servers): they go first, so
# the workers finish together. A scheduling hint only: a file missing here just runs in its turn.
HEAVY_FIRST = (
    "jaxserve/test_install.py", "jaxserve/engine/test_structured_output.py", "jaxserve/test_sharding.py",
    "jaxserve/engine/test_kv_quant_engine.py", "jaxserve/engine/test_spec_decode.py",
    "jaxserve/entrypoints/test_make_serve.py", "models/test_hf_parity.py", "models/test_gemma.py",
    "jaxserve/engine/test_overlap.py", "jaxserve/test_weight_quant_sharding.py", "jaxserve/test_demo_model.py",
    "jaxserve/engine/test_sliding_window.py", "jaxserve/engine/test_engine.py", "jaxserve/test_kv_quant_sharding.py",
    "jaxserve/entrypoints/test_http_limits.py", "pallas_kernels/test_rpa_kernels.py",
)


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    rank = {os.path.join(here, *name.split("/")): i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(str(item.path), len(rank)))  # stable: each file's own order kept
