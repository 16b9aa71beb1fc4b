"""Test setup: 8 CPU devices for sharding tests (set before jax is imported)."""
import os
import shutil
import tempfile

# XLA:CPU's classic emitters compile the suite's small programs faster than its newer fusion
# emitters (docs/results.md, "Test suite time"); CPU only, so a GPU run never sees a CPU flag its
# XLA may not know.
CPU_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"
if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {CPU_COMPILE_FLAGS}")
else:
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache on disk per test run, shared by the xdist workers and by the scripts and
# notebook kernels the tests start (they inherit the environment): every worker clears its
# compiled programs after each module, and many modules and subprocesses compile the same small
# programs again (docs/results.md, "Test suite time"). The process that made it removes it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="memarch-tests-xla-cache-")
  os.environ["MEMARCH_TESTS_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402

# The suite compiles hundreds of tiny programs: XLA's optimisation passes cost more compile time
# than they save at these sizes (about 2x faster overall on 2 cores).
jax.config.update("jax_disable_most_optimizations", True)


def pytest_configure(config):
  """pytest 9.2 keeps node ids where pytest-xdist (3.8) cannot append a group name, so --dist
  loadgroup silently ignores every xdist_group mark: module fixtures are then built on both
  workers and the suite takes longer. Refused with one line instead."""
  from importlib import metadata

  from packaging.version import Version
  if getattr(config.option, "dist", "no") != "loadgroup" or not config.getoption("numprocesses"):
    return
  xdist = metadata.version("pytest-xdist")
  if Version(pytest.__version__) >= Version("9.2") and Version(xdist) <= Version("3.8.0"):
    raise pytest.UsageError(
        f"pytest {pytest.__version__} with pytest-xdist {xdist} ignores the suite's xdist_group "
        "marks; install the test extra's versions: pip install -e '.[test]'")


def pytest_unconfigure(config):
  if os.environ.get("MEMARCH_TESTS_CACHE_OWNER") == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  has_gpu = (os.environ.get("JAX_PLATFORMS") != "cpu"
             and any(d.platform == "gpu" for d in jax.devices()))
  if has_gpu:  # float32 parity on the device: no TF32 in the xla / reference paths
    jax.config.update("jax_default_matmul_precision", "highest")
  skip_gpu = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops each test module's compiled programs when it ends: one suite process compiles thousands
  of programs, and a full run once crashed inside XLA's CPU compiler late in the suite (a
  segfault that the same tests alone never show)."""
  yield
  jax.clear_caches()


@pytest.fixture
def x64():
  """float64 for tests where an equivalence must be exact."""
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", old)
