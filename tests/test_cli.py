"""Entry points: one line per anticipated error with exit status 2, tracebacks only with --verbose,
bad configs refused before any data is built, pre-emption as exit status 75."""

import os
import re
import subprocess
import sys

import pytest

from fermsca import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_maps_errors_to_statuses(capsys):
    def fails():
        raise ValueError("config.loss='x': expected one of ['cosine']")

    assert cli.run(fails) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err == "error: config.loss='x': expected one of ['cosine']\n"
    assert cli.run(fails, verbose=True) == cli.EXIT_ERROR
    assert "Traceback" in capsys.readouterr().err

    def preempted():
        raise cli.Preempted("pre-empted at step 3")

    assert cli.run(preempted) == cli.EXIT_PREEMPTED == 75
    assert capsys.readouterr().err == "pre-empted at step 3\n"
    assert cli.run(lambda: None) == 0 and cli.run(lambda: 1) == 1

    def bug():
        raise KeyError("a bug is not an anticipated error")

    with pytest.raises(KeyError):
        cli.run(bug)


def _main(tmp_path, *flags, python_flags=()):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    cmd = [sys.executable, *python_flags, "-m", "fermsca.main", "--config", "configs/default.py",
           f"--workdir={tmp_path / 'run'}", f"--config.dataset.data_dir={tmp_path / 'tfds'}", *flags]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


FERPLUS_NOWHERE = ["--config.dataset.name=ferplus", "--config.dataset.manual_dir=/nonexistent"]


def test_main_data_error_is_one_line(tmp_path):
    proc = _main(tmp_path, *FERPLUS_NOWHERE, python_flags=("-X", "importtime"))
    assert proc.returncode == cli.EXIT_ERROR
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == "error: /nonexistent: manual_dir is not a folder"
    # Found before TensorFlow is imported (seconds): `-X importtime` lists every module imported.
    assert not re.search(r"\|\s*tensorflow$", proc.stderr, re.MULTILINE)
    verbose = _main(tmp_path, *FERPLUS_NOWHERE, "--verbose")
    assert verbose.returncode == cli.EXIT_ERROR and "Traceback" in verbose.stderr


@pytest.mark.parametrize("flag, message", [
    ("--config.loss=cosin", "error: config.loss='cosin': expected one of ['cosine', 'cross_entropy']"),
    ("--config.keep_checkpoints=0", "error: config.keep_checkpoints=0: must be >= 1"),
    ("--config.model.widths=(8,8,8,8,8,8)", "error: config.model.widths=(8, 8, 8, 8, 8, 8): 6 residual "
     "blocks pool the 48x48 input down to 0x0 (sides [24, 12, 6, 3, 1, 0]); use at most 5 blocks"),
])
def test_main_checks_the_config_before_the_data(tmp_path, flag, message):
    # The data would fail too (no such folder): the config error comes first.
    proc = _main(tmp_path, *FERPLUS_NOWHERE, flag)
    assert proc.returncode == cli.EXIT_ERROR
    assert proc.stderr.splitlines()[-1] == message


def test_main_refuses_a_repeated_override(tmp_path):
    proc = _main(tmp_path, "--config.model.widths=(8,8)", "--config.model.widths=(8,8)")
    assert proc.returncode != 0
    assert "--config.model.widths given more than once" in proc.stderr


def test_flag_value_takes_either_form_and_the_last():
    assert cli.flag_value(["prog", "--config", "a.py", "--workdir=w"], "config") == "a.py"
    assert cli.flag_value(["prog", "--config=a.py", "--config=b.py:x"], "config") == "b.py:x"
    assert cli.flag_value(["prog", "--config.seed=1"], "config") is None
    assert cli.flag_value(["prog", "--config"], "config") is None


def test_config_package_on_path_only_for_a_configs_package(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    cli.config_package_on_path(os.path.join(REPO, "configs", "ferplus.py") + ":arg")
    assert sys.path[0] == REPO
    (tmp_path / "loose.py").write_text("")
    cli.config_package_on_path(str(tmp_path / "loose.py"))  # no `configs` package: unchanged
    cli.config_package_on_path(None)
    assert sys.path[0] == REPO and str(tmp_path) not in sys.path


def test_config_files_load_from_any_folder(tmp_path):
    # `from configs import default` inside a config file, outside the repository root: what
    # `python -m fermsca.main --config /path/to/configs/ferplus.py` relies on (it parses flags the same way).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = ("import sys\nfrom absl import flags\nfrom ml_collections import config_flags\n"
              "from fermsca import cli\ncli.config_package_on_path(cli.flag_value(sys.argv, 'config'))\n"
              "config_flags.DEFINE_config_file('config')\nflags.FLAGS(sys.argv)\n"
              "print(flags.FLAGS.config.dataset.name, flags.FLAGS.config.num_epochs)\n")
    cmd = [sys.executable, "-c", script, "--config", os.path.join(REPO, "configs", "ferplus_plus.py")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ferplus", "60"]
    # Without the helper the same command fails: the check above is not vacuous.
    bare = subprocess.run([sys.executable, "-c", script.replace("cli.config_package_on_path", "len"),
                           "--config", os.path.join(REPO, "configs", "ferplus_plus.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0 and "No module named 'configs'" in bare.stderr
