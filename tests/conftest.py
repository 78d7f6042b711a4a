"""Test session set-up: one JAX compilation cache for this run, shared by its workers and by the
training runs the tests start as subprocesses (they compile the same tiny steps again and again).

The cache is new for every test run, so no test depends on what an earlier run left behind.
"""

import os
import tempfile

import pytest


def _session_cache_dir() -> str:
    # Under pytest-xdist every worker gets its own base temp; their parent is this run's own.
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
    return os.path.join(tempfile.gettempdir(), f"fermsca-test-jax-cache-{run_id}")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache():
    from fermsca import hostenv

    directory = _session_cache_dir()
    os.environ[hostenv.CACHE_ENV] = directory  # inherited by `python -m fermsca.*` subprocesses
    hostenv.enable_compilation_cache(directory)
    return directory
