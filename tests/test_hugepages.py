"""fermsca.perf.hugepages: one re-exec with the tunable added, other tunables kept, opt-out."""

import os
import subprocess
import sys

import pytest

from fermsca.perf import hugepages

SCRIPT = (
    "import os, sys\n"
    "from fermsca.perf import hugepages\n"
    "print('start', flush=True)\n"
    "hugepages.ensure()\n"
    "print('argv', sys.argv[1:])\n"
    "print('tunables', os.environ.get('GLIBC_TUNABLES'))\n"
)


def run(env_extra: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FERMSCA_HUGEPAGES")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", SCRIPT, "--flag", "x"], env=env, capture_output=True,
                         text=True, check=True, timeout=60)
    return out.stdout.splitlines()


supported, why = hugepages.supported()


@pytest.mark.skipif(not supported, reason=f"huge-page malloc unsupported here: {why}")
def test_restarts_once_with_the_tunable_and_keeps_arguments():
    lines = run({})
    assert lines.count("start") == 2  # the original process and its one restart
    assert lines[-2:] == ["argv ['--flag', 'x']", f"tunables {hugepages.TUNABLE}"]


@pytest.mark.skipif(not supported, reason=f"huge-page malloc unsupported here: {why}")
def test_keeps_other_tunables():
    lines = run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert lines[-1] == f"tunables glibc.malloc.arena_max=2:{hugepages.TUNABLE}"


def test_no_restart_when_set_or_turned_off():
    assert run({"GLIBC_TUNABLES": hugepages.TUNABLE}).count("start") == 1
    lines = run({"FERMSCA_HUGEPAGES": "0"})
    assert lines.count("start") == 1 and lines[-1] == "tunables None"


def test_supported_reason_is_specific():
    ok, reason = hugepages.supported()
    assert ok == (reason == "")
