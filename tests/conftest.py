"""Test session set-up: a JAX compilation cache for this run, shared with the training runs the
tests start as subprocesses (they compile the same tiny steps again and again).

The cache is new for every test run, so no test depends on what an earlier run left behind.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile

import pytest

# LLVM's lowest optimisation level for every step the tests compile, here and in the runs they start
# (set before JAX is imported): about a fifth less CPU time for the suite, whose tests compare
# results and never time anything (speed lives in the benchmarks). An explicit level is kept.
_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _XLA_FLAGS:
    os.environ["XLA_FLAGS"] = f"{_XLA_FLAGS} --xla_backend_optimization_level=0".strip()


def _session_cache_dir() -> str:
    # One per test run and pytest-xdist worker: JAX writes cache entries in place, so two workers
    # sharing one could read each other's half-written entries.
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return os.path.join(tempfile.gettempdir(), f"fermsca-test-jax-cache-{run_id}-{worker}")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache():
    from fermsca import hostenv

    directory = _session_cache_dir()
    os.environ[hostenv.CACHE_ENV] = directory  # inherited by `python -m fermsca.*` subprocesses
    hostenv.enable_compilation_cache(directory)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


# A tiny FERNet with random weights and its checkpoint in a training run's layout, for the tests of
# the model API and the tools on it (test_inference, test_predict, test_webcam).
@pytest.fixture(scope="module")
def tiny_model():
    import tiny_run

    from fermsca import inference

    config = tiny_run.tiny_config()
    model = inference.build_model(config.model, len(tiny_run.CLASS_NAMES))
    return config, model, tiny_run.random_variables(model, seed=0)


@pytest.fixture(scope="module")
def workdir(tiny_model, tmp_path_factory):
    import tiny_run

    config, _, variables = tiny_model
    return tiny_run.save_run_checkpoint(str(tmp_path_factory.mktemp("run")), config, variables)


@pytest.fixture(scope="session")
def face_clip(tmp_path_factory):
    """An mp4v video, 12 frames of 320x240 at 10 frames/s: two faces (96 px) that move 2 px right
    per frame, and the frames as decoded (fixtures.write_face_clip; test_predict, test_webcam)."""
    import fixtures

    path = str(tmp_path_factory.mktemp("clip") / "clip.mp4")
    return path, fixtures.write_face_clip(path)


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
    """`with built_once(tmp_path_factory, name) as (path, build):` gives a folder shared by every
    pytest-xdist worker of this test run; `build` is True for the one worker that must fill it
    (the others wait for it). A costly session fixture is then made once per run, not per worker."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's folder, above the workers' own
    path = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = base / f"{name}.done"
        yield path, not done.exists()
        done.touch()
