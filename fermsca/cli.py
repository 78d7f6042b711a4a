"""What every command-line entry point shares: one-line errors and documented exit statuses.

Exit statuses (README, "When things go wrong"):
  0   done
  1   predict only: some inputs could not be used (the others were processed)
  2   an anticipated error: bad data, config, checkpoint or arguments; one line on stderr says what
      and where (`--verbose` adds the traceback)
  75  pre-empted (SIGTERM): a checkpoint was saved; rerun the same command to resume
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

EXIT_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later


class ConfigError(ValueError):
    """A config field is unknown, missing or out of range; the message names the field."""


class Preempted(Exception):  # noqa: N818 - an event, not a failure
    """SIGTERM arrived; what could be saved was saved."""


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The last value of `--name VALUE` or `--name=VALUE` in `argv` (None when absent)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def config_package_on_path(config_path: str | None) -> None:
    """Puts the folder above a config file's `configs` package first on `sys.path`.

    Config files import their siblings (`from configs import default`, as in the Flax examples), so
    without this a command works only from the repository root; with it, from any folder. Entry
    points call it before parsing flags: ml_collections loads the config file while parsing them.
    """
    if not config_path:
        return
    folder = os.path.dirname(os.path.abspath(config_path.split(":", 1)[0]))  # `file.py:arg` is allowed
    if os.path.basename(folder) == "configs" and os.path.isfile(os.path.join(folder, "__init__.py")):
        root = os.path.dirname(folder)
        if root in sys.path:
            sys.path.remove(root)
        sys.path.insert(0, root)


def anticipated_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or a bad environment, not a bug: reported in one line."""
    from fermsca import checkpoint
    from fermsca.datasets import DataError

    found = [ConfigError, DataError, ValueError, OSError, checkpoint.CheckpointError,
             FloatingPointError, MemoryError]
    try:
        from fermsca import faces

        found.append(faces.FaceDetectorError)
    except ImportError:  # OpenCV missing: its own ImportError is then the one-line error
        pass
    return tuple(found)


def one_line(error: BaseException) -> str:
    """`error: <message>`: the message is the error's own; multi-line messages (file lists) stay."""
    message = str(error).strip() or type(error).__name__
    return f"error: {message}"


def run(body: Callable[[], int | None], verbose: bool = False) -> int:
    """Runs `body`, turning anticipated errors into one line on stderr and `EXIT_ERROR`, and a
    pre-emption into `EXIT_PREEMPTED`. With `verbose`, the traceback is printed as well."""
    try:
        status = body()
    except Preempted as p:
        print(str(p) or "pre-empted", file=sys.stderr)
        return EXIT_PREEMPTED
    except anticipated_errors() as e:
        if verbose:
            traceback.print_exc()
        print(one_line(e), file=sys.stderr)
        return EXIT_ERROR
    return 0 if status is None else int(status)


def raise_on_sigterm() -> Callable[[], None]:
    """Until the returned function is called, SIGTERM raises `Preempted` in the main thread (e.g.
    while data is being built, before there is anything to save)."""

    def handle(signum, frame):
        logging.warning("SIGTERM received before training started: stopping")
        raise Preempted("pre-empted (SIGTERM) before training started: nothing to save; "
                        "rerun the same command")

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


class Preemption:
    """Within `with Preemption() as p:`, SIGTERM only sets `p.requested`; the training loop checks
    it between steps, saves what it can and stops (raising an exception from the signal handler
    could land anywhere, even in a destructor that swallows it)."""

    def __init__(self, message: str = "SIGTERM received: saving a checkpoint and stopping"):
        self.requested = False
        self._message = message
        self._previous = None

    def __enter__(self) -> Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning(self._message)
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_process(self) -> bool:
        """Whether any process of a multi-process run got SIGTERM (all processes must stop at the
        same step); one process: `requested`."""
        import jax

        if jax.process_count() == 1:
            return self.requested
        import numpy as np
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags))
