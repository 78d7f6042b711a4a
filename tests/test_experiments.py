"""The study tables and the report on small hand-made results.json files (nothing is trained)."""

import functools
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from experiments.paper import common, report, scaling, table2_lr, table3_ablation, table4_compare


def fake_results(accuracy: float, dataset: str = "synthetic_faces", split: str = "test",
                 epochs: float = 4, macro_f1: float | None = None) -> dict:
    best = {"accuracy": accuracy, "macro_f1": accuracy - 0.05 if macro_f1 is None else macro_f1}
    return {
        "status": "completed",
        "accuracy": accuracy,
        "evaluated_split": split,
        "evaluations": {"best": best, "last": dict(best)},
        "best_validation_accuracy": accuracy + 0.01,
        "epochs": epochs,
        "wall_time_seconds": 60.0,
        # as the quick budget trains, and FER+ as configs/ferplus.py (the full budget)
        "config": ({"model": {"widths": [64, 128, 256], "stem_width": 64}, "batch_size": 128}
                   if dataset == "ferplus" else
                   {"model": {"widths": [16, 32, 64], "stem_width": 16}, "batch_size": 64}),
        "dataset": {"name": dataset, "split_sizes": {"train": 4000, "validation": 800, "test": 800}},
        "device_kind": "cpu",
        "device_count": 1,
    }


def write(path: Path, results: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(results))
    return path / "results.json"


def link_targets(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", markdown)


# Numbers and markdown ---------------------------------------------------------------------------


def test_mean_std_is_the_sample_std():
    values = [0.91, 0.95, 0.88, 0.97]
    mean, std = common.mean_std(values)
    assert mean == pytest.approx(np.mean(values))
    assert std == pytest.approx(np.std(values, ddof=1))
    assert common.mean_std([0.5]) == (0.5, None)
    with pytest.raises(ValueError):
        common.mean_std([])


def test_format_mean_std():
    assert common.format_mean_std([0.81234]) == "0.8123"
    assert common.format_mean_std([0.9, 1.0]) == "0.9500 ± 0.0707 (n=2)"


def test_markdown_table_escapes_pipes_and_checks_widths():
    text = common.markdown_table(["a", "b"], [[1, "x|y"], ["z", 2.5]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |", "| z | 2.5 |"]
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        common.markdown_table(["a", "b"], [[1]])


def test_config_flags_formats_each_field_once():
    flags = common.config_flags({"model.widths": (16, 32, 64), "model.use_se": False,
                                 "optimizer.learning_rate": 1e-4, "loss": "cosine",
                                 "dataset.fold": 3})
    assert flags == ["--config.model.widths=(16,32,64)", "--config.model.use_se=False",
                     "--config.optimizer.learning_rate=0.0001", "--config.loss=cosine",
                     "--config.dataset.fold=3"]
    assert common.format_value((8,)) == "(8,)"


def test_parse_folds_and_sets():
    assert common.parse_folds("all", 10) == list(range(10))
    assert common.parse_folds("0-2,7", 10) == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="outside"):
        common.parse_folds("10", 10)
    assert common.parse_sets(["batch_size=8", "config.model.dtype=bfloat16"]) == {
        "batch_size": "8", "model.dtype": "bfloat16"}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        common.parse_sets(["batch_size"])


def test_table2_rows_are_the_papers_rates():
    constant = [r.overrides["optimizer.learning_rate"] for r in table2_lr.STUDY.rows
                if r.overrides.get("optimizer.schedule") == "constant"]
    np.testing.assert_allclose(constant, [1e-2, 1e-3, 1e-4, 1e-5])
    assert table2_lr.STUDY.rows[-1].overrides == {"optimizer.schedule": "table1"}


def test_ckplus_rows_repeat_over_folds():
    kfold = common.Row("a", ("a",), {})
    random = common.Row("b", ("b",), {"dataset.protocol": "random"})
    assert common.repeats(kfold, "synthetic_faces", [0, 1]) == [("", {})]
    assert common.repeats(kfold, "ckplus", [0, 1]) == [("fold_0", {"dataset.fold": 0}),
                                                       ("fold_1", {"dataset.fold": 1})]
    assert common.repeats(random, "ckplus", [2]) == [("fold_2", {"dataset.fold": 2})]
    for protocol in ("leaky", "all"):
        with pytest.raises(ValueError, match=rf"dataset.protocol='{protocol}'; studies cross-validate "
                           r"CK\+ with 'kfold' or 'random' \('all' has no test folds\)"):
            common.repeats(kfold, "ckplus", [0], {"dataset.protocol": protocol})


def test_rows_repeat_over_seeds_except_on_ckplus():
    row = common.Row("a", ("a",), {})
    assert common.repeats(row, "ferplus", [0], seeds=[0, 1]) == [("seed_0", {"seed": 0}),
                                                                  ("seed_1", {"seed": 1})]
    assert common.repeats(row, "ckplus", [3], seeds=[0, 1]) == [("fold_3", {"dataset.fold": 3})]
    assert common.parse_seeds("0-2") == [0, 1, 2] and common.parse_seeds("4,1") == [4, 1]
    for bad in ("1,1", "-1", "a"):
        with pytest.raises(ValueError):
            common.parse_seeds(bad)


def test_recipe_levers_change_one_thing_each_at_the_stated_budget(capsys):
    from configs import ferplus
    from experiments.paper import recipe_levers
    from fermsca import config_schema

    study = recipe_levers.STUDY
    assert study.rows[0].overrides == {} and study.seeds == (0, 1)
    assert study.budget["full"]["num_epochs"] == 30 and "30 epochs" in study.note
    levers = [r for r in study.rows[1:-1]]
    assert len({r.name for r in levers}) == len(levers) == 11
    assert study.rows[-1].name == "recipe"
    two_fields = {"warmup_cosine": {"optimizer.schedule", "optimizer.warmup_epochs"},
                  "wider": {"model.stem_width", "model.widths"}}
    rows = {r.name: r for r in study.rows}
    for row in levers:  # one lever per row, over the row it is measured against
        reference = rows[row.against].overrides if row.against else {}
        assert reference.items() <= row.overrides.items()
        lever = set(row.overrides) - set(reference)
        assert len(lever) == 1 or lever == two_fields[row.name]
        config = ferplus.get_config()
        config.update_from_flattened_dict(dict(row.overrides))
        config_schema.validate(config)  # every lever is a valid config
    common.main(study, ["--manual_dir", "/data/ferplus", "--dry_run", "--rerun", "--rows", "ema"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("--config.ema_decay=0.999" in line for line in out)
    assert "--config.num_epochs=30" in out[0] and "--config.seed=1" in out[1]


def test_recipe_row_trains_configs_ferplus_plus_from_levers_each_measured_alone():
    from configs import ferplus, ferplus_plus
    from experiments.paper import recipe_levers
    from fermsca import config_schema

    recipe = recipe_levers.STUDY.rows[-1]
    assert recipe.name == "recipe" and recipe.overrides  # at least one lever paid
    # configs/ferplus.py with the row's overrides and the recipe's budget is configs/ferplus_plus.py.
    config = ferplus.get_config()
    config.update_from_flattened_dict({**recipe.overrides, "num_epochs": 60})
    assert config_schema.flatten(config) == config_schema.flatten(ferplus_plus.get_config())
    config_schema.validate(ferplus_plus.get_config())
    # Every lever in the recipe is one the study trained alone, at the same value.
    alone = {(field, value) for row in recipe_levers.STUDY.rows[1:-1]
             for field, value in row.overrides.items()}
    assert set(recipe.overrides.items()) <= alone


def fold_results(k: int, right: int, wrong: int) -> dict:
    """A CK+ fold's results.json as fermsca.crossval writes it: `right` of `right + wrong` test
    images right (anger called contempt when wrong)."""
    from fermsca import report as metrics
    from fermsca.datasets import ckplus

    cm = np.zeros((7, 7), int)
    cm[0, 0], cm[0, 1] = right, wrong
    last = metrics.confusion_metrics(cm, ckplus.CLASS_NAMES)
    return {**fake_results(last["accuracy"], "ckplus"), "repeat": f"fold_{k}",
            "evaluations": {"last": last},
            "dataset": {"name": "ckplus", "class_names": list(ckplus.CLASS_NAMES)}}


def test_ckplus_row_trains_its_folds_together_and_files_each_fold(tmp_path, monkeypatch, capsys):
    import subprocess

    calls, run = [], subprocess.run

    def fake_crossval(cmd, **kwargs):  # what experiments.paper.ckplus_cv leaves behind
        if "experiments.paper.ckplus_cv" not in cmd:  # e.g. what a library runs on import
            return run(cmd, **kwargs)
        calls.append(cmd)
        workdir = Path(cmd[cmd.index("--workdir") + 1])
        folds = [int(k) for k in cmd[cmd.index("--folds") + 1].split(",")]
        widths = next(c for c in cmd if c.startswith("--config.model.widths="))
        for k in folds:
            write(workdir / f"fold_{k}", {**fold_results(k, right=9 + k, wrong=1), "config": {
                "model": {"widths": [int(w) for w in widths.split("=")[1].strip("()").split(",")]},
                "dataset": {"fold": k}}})
        (workdir / "summary.json").write_text(json.dumps(
            {"repeats": [f"fold_{k}" for k in folds], "accuracy_mean": 0.5, "wall_time_seconds": 60.0,
             "device_kind": "cpu"}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(common.subprocess, "run", fake_crossval)
    args = ("t2", "quick", "ckplus-a", "configs/ckplus.py",
            {"num_epochs": 4, "dataset.fold": 9, "model.widths": (16, 32)}, [0, 3])
    kwargs = dict(scratch=tmp_path / "scratch", results_root=tmp_path / "results")
    paths = common.train_folds_row(*args, **kwargs)
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "experiments.paper.ckplus_cv", "--config"]
    assert cmd[cmd.index("--folds") + 1] == "0,3"
    assert "--config.model.widths=(16,32)" in cmd and not any("dataset.fold" in c for c in cmd)
    dest = tmp_path / "results" / "t2" / "quick" / "ckplus-a"
    assert paths == [dest / "fold_0" / "results.json", dest / "fold_3" / "results.json"]
    assert common.load_json(paths[1])["accuracy"] == 12 / 13
    assert (dest / "confusion_matrix.png").is_file()
    assert not (tmp_path / "scratch" / "t2" / "quick" / "ckplus-a").exists()  # workdir removed
    summary = common.load_json(dest / "summary.json")  # over the folds filed, not the fake's 0.5
    assert summary["accuracy_mean"] == pytest.approx((0.9 + 12 / 13) / 2)
    assert summary["pooled"]["accuracy"] == 21 / 23 and summary["pooled"]["num_examples"] == 23
    assert summary["batches"] == [{"repeats": ["fold_0", "fold_3"], "wall_time_seconds": 60.0,
                                   "device_kind": "cpu"}]
    assert "over 2 folds (this batch: 2" in capsys.readouterr().out
    assert common.train_folds_row(*args, **kwargs) == paths and len(calls) == 1  # done: not rerun

    # A second batch of folds joins the first: nothing filed earlier is lost.
    more = common.train_folds_row(*args[:5], [5], **kwargs)
    assert more == [dest / "fold_5" / "results.json"] and paths[0].is_file() and paths[1].is_file()
    summary = common.load_json(dest / "summary.json")
    assert summary["repeats"] == ["fold_0", "fold_3", "fold_5"]
    assert [b["repeats"] for b in summary["batches"]] == [["fold_0", "fold_3"], ["fold_5"]]
    # A batch of a changed row is not pooled with the folds filed before it: it stops, naming them.
    changed = {**args[4], "model.widths": (8, 16)}
    with pytest.raises(common.RunError, match=r"fold_0/results.json was trained with another "
                                              r"configuration .*model.widths: \(16, 32\) in the results"):
        common.train_folds_row(*args[:4], changed, [7], **kwargs)
    assert len(calls) == 2 and not (dest / "fold_7").exists()
    # --rerun replaces the batch's own folds only: the other folds filed must still match.
    with pytest.raises(common.RunError, match="fold_3/results.json was trained with another"):
        common.train_folds_row(*args[:4], changed, [0], **kwargs, rerun=True)

    monkeypatch.setattr(common.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 75))
    with pytest.raises(common.RunError, match="pre-empted .* repeat the command to resume"):
        common.train_folds_row(*args, **kwargs, rerun=True)


def test_lane_cores_split_the_cpus_into_disjoint_even_groups():
    assert common.lane_cores([0, 1], 2) == [(0,), (1,)]
    assert common.lane_cores([3, 0, 1, 2, 4], 2) == [(0, 1, 2), (3, 4)]
    assert common.lane_cores([0, 1, 2, 3], 1) == [(0, 1, 2, 3)]
    for lanes in (0, 3):
        with pytest.raises(ValueError, match="between 1 and the 2 CPUs"):
            common.lane_cores([0, 1], lanes)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux-only")
def test_a_pinned_command_runs_on_its_cpus_only(tmp_path):
    cpu = min(os.sched_getaffinity(0))
    report_affinity = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    common._run_logged(report_affinity, tmp_path / "w", "probe", rerun=False, dry_run=False, cpus=(cpu,))
    assert (tmp_path / "w.log").read_text().strip() == f"[{cpu}]"
    assert common.pinned(report_affinity, None) == report_affinity


def test_lanes_run_jobs_side_by_side_each_on_its_own_cpus():
    started, lock = [], threading.Lock()
    both_running = threading.Barrier(2, timeout=10)

    def job(name, cpus):
        with lock:
            started.append((name, cpus))
        if name in ("a", "b"):  # the first two run at once, or the barrier times out
            both_running.wait()

    tables = []
    common.run_jobs([functools.partial(job, n) for n in "abc"], 2, lambda: tables.append(1), cpus=[0, 1])
    assert sorted(c for n, c in started if n in "ab") == [(0,), (1,)]
    assert len(started) == 3 and len(tables) == 3
    common.run_jobs([functools.partial(job, "c")], 1, lambda: None)
    assert started[-1] == ("c", None)  # one lane: every CPU, nothing pinned


def test_after_a_failure_no_new_job_starts_and_the_failure_is_raised():
    ran, b_started = [], threading.Event()

    def job(name, cpus):
        ran.append(name)
        if name == "b":
            b_started.set()
            time.sleep(0.05)  # still busy when a's failure is filed
        if name == "a":
            b_started.wait(timeout=10 if cpus else 0)  # with two lanes, fail once b runs beside a
            raise common.RunError("a failed")

    with pytest.raises(common.RunError, match="a failed"):
        common.run_jobs([functools.partial(job, n) for n in "abc"], 1, lambda: None)
    assert ran == ["a"]
    ran.clear()
    with pytest.raises(common.RunError, match="a failed"):
        common.run_jobs([functools.partial(job, n) for n in "abcdef"], 2, lambda: None, cpus=[0, 1])
    assert sorted(ran) == ["a", "b"]  # the other lane's job finishes; later ones never start


def test_study_dry_run_with_lanes_pins_each_run(capsys, monkeypatch):
    from experiments.paper import recipe_levers

    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    common.main(recipe_levers.STUDY, ["--manual_dir", "/d", "--dry_run", "--rerun", "--rows", "ema",
                                      "--lanes", "2"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and {line.split("]")[0] for line in out} == {"[CPUs 0", "[CPUs 1"}
    with pytest.raises(SystemExit):
        common.main(recipe_levers.STUDY, ["--manual_dir", "/d", "--dry_run", "--lanes", "3"])


# Study tables -----------------------------------------------------------------------------------


def test_study_table_rows_link_to_their_results(tmp_path):
    study = table3_ablation.STUDY
    base = tmp_path / study.name / "quick"
    write(base / "synthetic_faces-se0_bn0", fake_results(0.70))
    write(base / "synthetic_faces-se1_bn1", fake_results(0.80))
    for k, acc in enumerate((0.90, 0.94, 0.98)):
        write(base / "ckplus-se1_bn1" / f"fold_{k}", fake_results(acc, dataset="ckplus"))

    path = common.write_table(study, "quick", results_root=tmp_path)
    text = path.read_text()
    assert path == base / "table.md"
    assert "## synthetic faces" in text and "## CK+" in text
    synthetic, ckplus = text.split("## CK+")
    assert ("| × | × | 0.7000 | 0.6500 | 0.7100 | test | 4 | 60 | 0.8688 | 0.9728 | "
            "[results.json](synthetic_faces-se0_bn0/results.json) |") in synthetic
    assert "| × | × | not run |" in ckplus
    assert "not run" in text  # the SE-only and BN-only rows
    assert "0.9400 ± 0.0400 (n=3)" in text
    assert common.QUICK_NOTE in text
    targets = link_targets(text)
    assert len(targets) == 2 + 3
    assert all((base / t).is_file() for t in targets)
    assert "synthetic_faces-se0_bn0/results.json" in targets
    assert "ckplus-se1_bn1/fold_2/results.json" in targets


def test_levers_are_measured_against_the_baseline_row(tmp_path):
    from experiments.paper import recipe_levers

    study = recipe_levers.STUDY
    base = tmp_path / study.name / "quick"
    for k, (acc, f1, wall) in enumerate(((0.80, 0.60, 100.0), (0.82, 0.64, 120.0))):
        write(base / "synthetic_faces-baseline" / f"seed_{k}",
              {**fake_results(acc, macro_f1=f1, split="validation"), "wall_time_seconds": wall})
    for k, (acc, f1) in enumerate(((0.83, 0.70), (0.84, 0.66))):
        write(base / "synthetic_faces-flip" / f"seed_{k}",
              {**fake_results(acc, macro_f1=f1, split="validation"), "wall_time_seconds": 121.0})
    text = common.study_table(study, "quick", results_root=tmp_path)
    header = next(line for line in text.splitlines() if line.startswith("| Lever"))
    assert header.startswith("| Lever | Setting | Accuracy | Macro F1 | Gain: acc. (points) | "
                             "Gain: macro F1 (points) | Wall vs baseline | Best val. acc. |")
    flip = next(line for line in text.splitlines() if line.startswith("| horizontal flip"))
    # Paired by seed: (0.03 + 0.02) / 2 and (0.10 + 0.02) / 2 points; 242 s against 220 s
    assert ("| 0.8350 ± 0.0071 (n=2) | 0.6800 ± 0.0283 (n=2) | +2.50 (2 seeds) | +6.00 (2 seeds) "
            "| 1.10x |") in flip
    assert "| none (the paper's recipe) | - | 0.8100 ± 0.0141 (n=2) | 0.6200 ± 0.0283 (n=2) | - | - | - |" \
        in text
    assert "| label smoothing | 0.1 | not run |  |  |  |  |" in text
    def run(row, seed, wall, cpu=None):
        write(base / f"synthetic_faces-{row}" / f"seed_{seed}",
              {**fake_results(0.80, macro_f1=0.65, split="validation"), "wall_time_seconds": wall,
               **({"host": {"cpu": cpu}} if cpu else {})})

    def ema_line():
        return next(line for line in common.study_table(study, "quick", results_root=tmp_path)
                    .splitlines() if line.startswith("| weight EMA"))

    # A lever with one seed so far is paired with the baseline's run of that seed only.
    run("ema", 1, 60.0)
    assert "| -2.00 (1 seed) | +1.00 (1 seed) | 0.50x |" in ema_line()
    # Wall times are compared only between runs on the same CPU: another machine gives "-".
    run("ema", 1, 60.0, cpu="AMD EPYC (family 26, model 2; avx2 fma avx512f)")
    assert "| -2.00 (1 seed) | +1.00 (1 seed) | - |" in ema_line()
    for k in (0, 1):
        run("baseline", k, 100.0, cpu=f"CPU {k}")
        run("ema", k, 150.0, cpu="CPU 0")
    # seed 1's ema ran on another CPU than seed 1's baseline: only seed 0 is paired for the wall time
    assert "| +0.00 (2 seeds) | +0.00 (2 seeds) | 1.50x |" in ema_line()
    # Without a baseline row's results there is nothing to measure against: no gain columns.
    shutil.rmtree(base / "synthetic_faces-baseline")
    assert "Gain" not in common.study_table(study, "quick", results_root=tmp_path)


def test_a_second_seed_goes_only_to_levers_whose_gain_is_too_small_to_trust(tmp_path):
    from experiments.paper import recipe_levers

    study = recipe_levers.STUDY
    names = [r.name for r in study.rows]
    with pytest.raises(common.RunError, match="'baseline' row has no results yet"):
        common.rows_within(study, "full", "ferplus", 1.0, names, results_root=tmp_path)
    base = tmp_path / study.name / "full"
    for name, acc in (("baseline", 0.840), ("flip", 0.852), ("ema", 0.845), ("mixup", 0.830),
                      ("adamw", 0.8305)):
        write(base / f"ferplus-{name}" / "seed_0", fake_results(acc, "ferplus", split="validation"))
    # flip +1.2 and adamw -0.95 points: ema +0.5 and adamw are within a point; mixup -1.0 is on the edge
    kept = common.rows_within(study, "full", "ferplus", 1.0, names, results_root=tmp_path)
    assert kept == ["baseline", "labels_crossentropy", "labels_probability", "label_smoothing",
                    "mixup", "ema", "warmup_cosine", "adamw", "class_weighting",
                    "conv_bfloat16", "wider", "recipe"]  # rows not run yet are kept: nothing is known
    assert "flip" not in kept
    assert common.rows_within(study, "full", "ferplus", 0.6, ["flip", "ema", "adamw"],
                              results_root=tmp_path) == ["ema"]
    # `wider` is measured against the bfloat16 row: +0.3 over it is within a point, -1.5 over the
    # baseline would not be; the bfloat16 row comes along, for the next seed to pair with.
    write(base / "ferplus-conv_bfloat16" / "seed_0", fake_results(0.822, "ferplus", split="validation"))
    write(base / "ferplus-wider" / "seed_0", {**fake_results(0.825, "ferplus", split="validation"),
                                              "config": WIDER_CONFIG})
    assert common.rows_within(study, "full", "ferplus", 1.0, ["wider"], results_root=tmp_path) == [
        "conv_bfloat16", "wider"]
    write(base / "ferplus-conv_bfloat16" / "seed_0", fake_results(0.840, "ferplus", split="validation"))
    assert common.rows_within(study, "full", "ferplus", 1.0, ["wider"], results_root=tmp_path) == []


WIDER_CONFIG = {"model": {"stem_width": 96, "widths": [96, 192, 384], "conv_dtype": "bfloat16"},
                "batch_size": 128}


def test_a_costly_lever_is_measured_against_the_row_it_trains_beside(tmp_path):
    from experiments.paper import recipe_levers

    study = recipe_levers.STUDY
    wider = next(r for r in study.rows if r.name == "wider")
    assert wider.against == "conv_bfloat16" and wider.overrides == {
        "model.stem_width": 96, "model.widths": (96, 192, 384), "model.conv_dtype": "bfloat16"}
    base = tmp_path / study.name / "full"
    for row, acc, f1, wall in (("baseline", 0.85, 0.60, 100.0), ("conv_bfloat16", 0.84, 0.62, 40.0),
                               ("wider", 0.86, 0.61, 90.0)):
        write(base / f"ferplus-{row}" / "seed_0",
              {**fake_results(acc, "ferplus", split="validation", macro_f1=f1), "wall_time_seconds": wall,
               **({"config": WIDER_CONFIG} if row == "wider" else {})})
    text = common.study_table(study, "full", results_root=tmp_path)
    line = next(x for x in text.splitlines() if x.startswith("| wider network"))
    # +2.00 / -1.00 points and 2.25x over the bfloat16 row, not +1.00 / +1.00 / 0.90x over the baseline
    assert ("| +2.00 (1 seed, against bfloat16 convolutions) | -1.00 (1 seed, against bfloat16 "
            "convolutions) | 2.25x |") in line
    bf16 = next(x for x in text.splitlines() if x.startswith("| bfloat16 convolutions"))
    assert "| -1.00 (1 seed) | +2.00 (1 seed) | 0.40x |" in bf16
    # Without the bfloat16 row's results there is nothing to measure `wider` against.
    shutil.rmtree(base / "ferplus-conv_bfloat16")
    line = next(x for x in common.study_table(study, "full", results_root=tmp_path).splitlines()
                if x.startswith("| wider network"))
    assert "| 0.8600 | 0.6100 | - | - | - |" in line
    with pytest.raises(ValueError, match="row 'b' is measured against 'c', which is not one of its rows"):
        common.Study("s", "S", ("x",), (common.Row("a", ("a",), {}),
                                         common.Row("b", ("b",), {}, against="c")), baseline="a")


def test_results_of_a_row_that_changed_since_are_shown_as_stale_not_scored(tmp_path, capsys,
                                                                             monkeypatch):
    from experiments.paper import recipe_levers

    study = recipe_levers.STUDY
    base = tmp_path / study.name / "full"
    write(base / "ferplus-baseline" / "seed_0", fake_results(0.84, "ferplus", split="validation"))
    write(base / "ferplus-conv_bfloat16" / "seed_0", fake_results(0.83, "ferplus", split="validation"))
    # Trained when the row was float32 widths 96/192/384: the row now also sets bfloat16.
    write(base / "ferplus-wider" / "seed_0",
          {**fake_results(0.87, "ferplus", split="validation"),
           "config": {"model": {"stem_width": 96, "widths": [96, 192, 384], "conv_dtype": "float32"}}})
    # Recorded before the field existed: not compared. Recorded as a list, asked as a tuple: equal.
    assert common.config_mismatches({"model.conv_dtype": "bfloat16", "model.widths": (1, 2)},
                                    {"model": {"widths": [1, 2]}}) == []
    # A string from --set is read as a literal; one that is no literal is not compared.
    assert common.config_mismatches({"batch_size": "8", "ema_decay": 0.999}, {"batch_size": 128}) == [
        "batch_size: 128 in the results, 8 asked"]
    assert common.config_mismatches({"model.widths": "(8,16)", "loss": "cosine"},
                                    {"model": {"widths": [8, 16]}, "loss": "cosine"}) == []
    assert common.config_mismatches({"optimizer.schedule": "warmup_cosine", "seed": "x1"},
                                    {"optimizer": {"schedule": "table1"}, "seed": 0}) == [
        "optimizer.schedule: 'table1' in the results, 'warmup_cosine' asked"]
    # Where the data is and how fast it ran are not what a run computes.
    assert common.config_mismatches({"dataset.manual_dir": "/b", "model.conv_impl": "xla"},
                                    {"dataset": {"manual_dir": "/a"}, "model": {"conv_impl": "auto"}}) == []
    text = common.study_table(study, "full", results_root=tmp_path)
    line = next(x for x in text.splitlines() if x.startswith("| wider network"))
    assert ("| stale: the row changed since this was trained (results.json: model.conv_dtype: "
            "'float32' in the results, 'bfloat16' asked); train it again with --rerun |") in line
    assert "0.87" not in line
    readme = report.ferplus_levers(tmp_path, tmp_path)
    assert "stale: the row changed since" in next(x for x in readme.splitlines()
                                                 if x.startswith("| wider network"))
    # A second seed is not picked from a stale row's gain: it is as unknown as a row never run.
    assert common.rows_within(study, "full", "ferplus", 0.5, ["wider"], results_root=tmp_path) == [
        "conv_bfloat16", "wider"]
    # Training it again without --rerun stops, saying why, instead of calling it done.
    with pytest.raises(common.RunError, match=r"trained with another configuration than this row's now "
                                              r"\(model.conv_dtype: 'float32' in the results"):
        common.train_row(study.name, "full", "ferplus-wider/seed_0", "configs/ferplus.py",
                         {"model.conv_dtype": "bfloat16", "dataset.manual_dir": "/elsewhere"},
                         scratch=tmp_path / "scratch", results_root=tmp_path)
    assert common.train_row(study.name, "full", "ferplus-baseline/seed_0", "configs/ferplus.py",
                            {"model.widths": (64, 128, 256), "dataset.manual_dir": "/elsewhere"},
                            scratch=tmp_path / "scratch", results_root=tmp_path).is_file()
    assert "already done" in capsys.readouterr().out
    # A lever dropped from a row shows too: the baseline trained with bfloat16 convolutions is not
    # the paper's recipe (a field another row sets is compared with the config's default).
    write(base / "ferplus-baseline" / "seed_1",
          {**fake_results(0.85, "ferplus", split="validation"),
           "config": {"model": {"widths": [64, 128, 256], "conv_dtype": "bfloat16"}}})
    baseline = common.row_summaries(study, "full", "ferplus", tmp_path)[1]["baseline"]
    assert baseline.stale == ("seed_1: model.conv_dtype: 'bfloat16' in the results, 'float32' asked",)
    # Every stale row is named before anything trains, not one by one hours apart.
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    with pytest.raises(SystemExit):
        common.main(study, ["--manual_dir", "/d", "--dry_run", "--seeds", "0,1",
                            "--rows", "baseline,flip,wider"])
    err = capsys.readouterr().err
    assert "results filed under another configuration than their rows' now" in err
    assert "ferplus-baseline/seed_1" in err and "ferplus-wider/seed_0" in err
    assert "ferplus-baseline/seed_0" not in err and "flip" not in err
    with pytest.raises(ValueError, match="row 'a' is measured against 'a'"):
        common.Study("s", "S", ("x",), (common.Row("a", ("a",), {}, against="a"),), baseline="a")


def test_cross_validated_rows_get_per_class_accuracy_pooled_over_folds(tmp_path):
    from fermsca import crossval
    from fermsca import report as metrics
    from fermsca.datasets import ckplus

    study = table3_ablation.STUDY
    base = tmp_path / study.name / "full"
    names = ckplus.CLASS_NAMES
    folds = []
    for k in range(2):
        cm = np.eye(7, dtype=int) * (k + 1)
        cm[1, 0] = 1  # one contempt image called anger in each fold
        folds.append({"repeat": f"fold_{k}", "accuracy": np.trace(cm) / cm.sum(), "evaluated_split": "test",
                      "evaluations": {"last": metrics.confusion_metrics(cm, names)}})
        write(base / "ckplus-se1_bn1" / f"fold_{k}", fake_results(0.9, dataset="ckplus"))
    (base / "ckplus-se1_bn1" / "summary.json").write_text(json.dumps(crossval.summarize(folds, names)))
    (base / "ckplus-se1_bn1" / "confusion_matrix.png").write_bytes(b"png")
    text = common.study_table(study, "full", results_root=tmp_path)
    assert "as in the paper's Fig. 8" in text
    header = "| SENet | BN | " + " | ".join(names) + " | Pooled acc. | Images | Confusion matrix |"
    assert header in text
    # contempt: 3 of 5 right over the two folds; the others all right; 21 of 23 in all
    assert ("| ✓ | ✓ | 1.000 | 0.600 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 0.9130 | 23 | "
            "[figure](ckplus-se1_bn1/confusion_matrix.png) |") in text
    pooled_rows = [line for line in text.splitlines() if line.endswith("confusion_matrix.png) |")]
    assert len(pooled_rows) == 1  # only the row with a cross-validation summary


def test_a_row_of_the_same_configuration_elsewhere_stands_in_and_says_so(tmp_path):
    """Table 3's SE + BN row is Table 2's Table 1 row: trained once, shown in both tables."""
    base = tmp_path / "table3_ablation" / "epochs_20"
    for k in range(2):
        write(tmp_path / "table2_lr" / "epochs_20" / "ckplus-table1" / f"fold_{k}",
              fake_results(0.9 + 0.02 * k, "ckplus", epochs=20))
    # Only Table 2's row has results: no Table 3 table.
    assert common.study_table(table3_ablation.STUDY, "epochs_20", results_root=tmp_path) is None
    write(base / "ckplus-se0_bn0" / "fold_0", fake_results(0.8, "ckplus", epochs=20))
    text = common.study_table(table3_ablation.STUDY, "epochs_20", results_root=tmp_path)
    (row,) = [line for line in text.splitlines() if line.startswith("| ✓ | ✓ |")]
    assert "0.9100 ± 0.0141 (n=2)" in row and "Table 2's Table 1 row (same configuration, run once)" in row
    targets = link_targets(row)
    assert targets == ["../../table2_lr/epochs_20/ckplus-table1/fold_0/results.json",
                       "../../table2_lr/epochs_20/ckplus-table1/fold_1/results.json"]
    assert all((base / t).is_file() for t in targets)
    # Its own results, once it has them, come first.
    write(base / "ckplus-se1_bn1" / "fold_0", fake_results(0.7, "ckplus", epochs=20))
    text = common.study_table(table3_ablation.STUDY, "epochs_20", results_root=tmp_path)
    (row,) = [line for line in text.splitlines() if line.startswith("| ✓ | ✓ |")]
    assert "0.7000" in row and "same configuration" not in row


def test_study_table_is_none_without_results(tmp_path):
    assert common.study_table(table3_ablation.STUDY, "full", results_root=tmp_path) is None
    assert common.write_table(table3_ablation.STUDY, "full", results_root=tmp_path) is None


def test_row_results_sort_folds_numerically(tmp_path):
    for k in (10, 2, 1):
        write(tmp_path / "row" / f"fold_{k}", fake_results(0.5))
    assert [p.parent.name for p in common.row_results(tmp_path / "row")] == [
        "fold_1", "fold_2", "fold_10"]
    assert common.row_results(tmp_path / "missing") == []


def test_summarize_rejects_unfinished_runs(tmp_path):
    bad = {**fake_results(0.5), "status": "preempted"}
    with pytest.raises(common.RunError, match="preempted"):
        common.summarize([bad], [tmp_path / "results.json"])


# Table 4 ----------------------------------------------------------------------------------------


def test_setup_line_names_the_budget_and_a_lowered_convolution_precision():
    results = fake_results(0.85, "ferplus", split="validation", epochs=200)
    assert common.setup_line(results) == ("4,000 train / 800 validation / 800 test images; "
                                          "widths (64, 128, 256), stem 64; batch 128; 200 epochs; "
                                          "1 x cpu")
    results["config"]["model"]["conv_dtype"] = "float32"
    assert "operands" not in common.setup_line(results)
    results["config"]["model"]["conv_dtype"] = "bfloat16"
    assert ("widths (64, 128, 256), stem 64; bfloat16 convolution operands; batch 128"
            in common.setup_line(results))


def test_table4_puts_ours_beside_published(tmp_path):
    ferplus = write(tmp_path / "ferplus_run", fake_results(0.85, "ferplus", split="validation"))
    for k, acc in enumerate((0.97, 0.99)):
        folds = fake_results(acc, "ckplus")
        folds["config"]["dataset"] = {"protocol": "kfold", "num_folds": 10}
        write(tmp_path / "ck" / f"fold_{k}", folds)
    write(tmp_path / "synthetic", fake_results(0.9))
    released = write(tmp_path / "ck_all", {**fake_results(0.9, "ckplus"), "evaluated_split": None,
                                           "accuracy": None, "evaluations": {}})
    ours, skipped = table4_compare.gather([str(ferplus), str(tmp_path / "ck"), str(released),
                                           str(tmp_path / "synthetic"), str(tmp_path / "none")])
    assert [o.dataset for o in ours] == ["ferplus", "ckplus"]
    assert f"{released}: trained on every image (CK+ protocol 'all'); nothing was evaluated" in skipped
    assert any("no published numbers" in s for s in skipped)
    assert any("no results" in s for s in skipped)
    text = table4_compare.table(ours, relative_to=tmp_path)
    assert "| FER+ | TFE-jL [14] | 0.8429 |" in text
    assert "| CK+ | PyConv-Attention Network [22] | 0.9846 |" in text
    assert "ours: validation split" in text
    assert "0.9800 ± 0.0141 (n=2)" in text
    assert "ours: test split; subject-independent 10-fold cross-validation; 4,000 train" in text
    assert all((tmp_path / t).is_file() for t in link_targets(text))
    published = [ln for ln in text.splitlines() if "published, as listed" in ln]
    assert len(published) == len(table4_compare.PUBLISHED) == 12


# Scaling ----------------------------------------------------------------------------------------


def fake_bench(kind: str, devices: int, batch: int, ips: float) -> dict:
    """A record as `fermsca.bench.benchmark` returns it, annotated as `scaling.measure` does."""
    bench = {"batch_size": batch, "steps": 10, "seconds": 5.0, "images_per_second": ips,
             "step_ms": 1000 * batch / ips, "compile_seconds": 2.0, "step_gflop": 1.3,
             "achieved_gflops": 9.0, "dtype": "float32", "device_kind": "cpu",
             "device_count": devices, "host": {"machine": "x86_64", "cpu_count": 2},
             "jax": "0", "widths": [16, 32, 64], "stem_width": 16}
    return {**scaling.annotate(bench, "cpu", devices, 1.5), "scaling": kind}


def test_scaling_efficiency_table_and_plot(tmp_path):
    records = [fake_bench("strong", 1, 64, 400.0), fake_bench("strong", 2, 64, 360.0),
               fake_bench("weak", 1, 16, 300.0), fake_bench("weak", 4, 64, 600.0)]
    rows = {(r["scaling"], r["devices"]): r for r in scaling.efficiencies(records)}
    assert rows["strong", 2]["speedup"] == pytest.approx(0.9)
    assert rows["strong", 2]["efficiency"] == pytest.approx(0.45)
    assert rows["weak", 4]["efficiency"] == pytest.approx(0.5)
    text = scaling.table(records, "quick", plot=tmp_path / "scaling.png", relative_to=tmp_path)
    assert "| strong | 2 | 64 | 32 | 360.0 | 177.8 | 0.90 | 0.45 | 2.0 |" in text
    assert "| weak | 4 | 64 | 16 | 600.0 |" in text
    assert "![scaling](scaling.png)" in text
    assert "cannot show speedup" in text
    scaling.plot(records, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(common.RunError, match="expected 4"):
        scaling.annotate({"device_count": 1, "batch_size": 8}, "cpu", 4, 0.0)


# README section ---------------------------------------------------------------------------------


def test_replace_section_touches_only_the_marked_part():
    text = f"# Title\n\nintro\n\n{report.BEGIN}\nold table\n{report.END}\n\n## After\ntext\n"
    new = report.replace_section(text, "| a |\n|---|\n| 1 |\n")
    assert new == (f"# Title\n\nintro\n\n{report.BEGIN}\n| a |\n|---|\n| 1 |\n{report.END}\n\n"
                   "## After\ntext\n")
    assert report.replace_section(new, "| a |\n|---|\n| 1 |") == new  # idempotent


def test_replace_section_requires_the_markers():
    assert not report.has_section("no markers")
    assert not report.has_section(f"{report.END} reversed {report.BEGIN}")
    with pytest.raises(ValueError, match="no"):
        report.replace_section("# README\n", "x")
    with pytest.raises(ValueError, match="expected one"):
        report.replace_section(f"{report.BEGIN}{report.END}{report.BEGIN}{report.END}", "x")


def test_report_gathers_tables_with_links_from_the_readme(tmp_path):
    results = tmp_path / "experiments" / "results"
    write(results / "table3_ablation" / "quick" / "synthetic_faces-se1_bn1", fake_results(0.8))
    write(results / "loss_study" / "full" / "ferplus-cosine", fake_results(0.86, "ferplus"))
    text = report.gather(tmp_path, results_root=results, table4_sources=[])
    assert "### Table 3: SE and BN ablation (quick)" in text
    assert "### Loss: cosine similarity against cross-entropy (full)" in text
    assert "### Table 4: comparison with published results" in text
    assert "Table 2" not in text  # no results, no table
    targets = link_targets(text)
    assert "experiments/results/table3_ablation/quick/synthetic_faces-se1_bn1/results.json" in targets
    assert all((tmp_path / t).is_file() for t in targets)


def test_report_main_rewrites_only_a_marked_readme(tmp_path, capsys):
    results = tmp_path / "experiments" / "results"
    write(results / "loss_study" / "quick" / "synthetic_faces-cosine", fake_results(0.7))
    readme = tmp_path / "README.md"
    readme.write_text("# Project\n")
    report.main(["--readme", str(readme)], results_root=results)
    assert readme.read_text() == "# Project\n"
    assert "printing the tables instead" in capsys.readouterr().out

    readme.write_text(f"# Project\n\n{report.BEGIN}\n{report.END}\n\nLicense\n")
    report.main(["--readme", str(readme)], results_root=results)
    text = readme.read_text()  # the index: one line per study, linked to every table
    assert text.startswith(f"# Project\n\n{report.BEGIN}\n| study |") and text.endswith(
        f"{report.END}\n\nLicense\n")
    assert "| Loss: cosine similarity against cross-entropy | quick | [table](" in text
    assert "[README.md](experiments/results/README.md)" in text
    tables = (results / "README.md").read_text()  # every table, linked from where it lies
    assert "\n## Loss" in tables
    assert "(loss_study/quick/synthetic_faces-cosine/results.json)" in tables
    assert all((results / t).is_file() for t in link_targets(tables))


def test_ckplus_headline_puts_both_protocols_side_by_side(tmp_path):
    results = tmp_path / "experiments" / "results"
    assert report.ckplus_results(tmp_path, results) is None  # nothing finished: no headline
    row = results / "ckplus_protocols" / "full" / "ckplus-kfold"
    for k in range(2):
        write(row / f"fold_{k}", {**fake_results(0.9, "ckplus", epochs=200),
                                  "config": {"dataset": {"num_folds": 10}}})
    (row / "summary.json").write_text(json.dumps({
        "accuracy_mean": 0.9234, "accuracy_std": 0.0441, "macro_f1_mean": 0.9012,
        "pooled": {"accuracy": 0.9246, "num_examples": 981, "per_class_accuracy": {"anger": 0.9}}}))
    (row / "confusion_matrix.png").write_bytes(b"png")
    text = report.ckplus_results(tmp_path, results)
    row_link = "experiments/results/ckplus_protocols/full/ckplus-kfold"
    assert ("| subject-independent 10-fold | **0.9234 ± 0.0441** over 2 of 10 test folds | "
            "0.9246 (981 images) | 0.9012 | 200 | "
            f"[summary.json]({row_link}/summary.json) [Fig. 8]({row_link}/confusion_matrix.png) |") in text
    assert "| image-level random 10-fold | not finished yet |" in text
    assert "99.32% without naming its protocol" in text and "nothing is selected on a test fold" in text
    index = report.index(tmp_path, results / "README.md", results)
    assert index.startswith("CK+ at the paper's settings") and "| study | budget | results |" in index
    # Folds trained under the other protocol than the row's are shown as stale, without numbers.
    for k in range(2):
        write(row / f"fold_{k}", {**fake_results(0.9, "ckplus", epochs=200),
                                  "config": {"dataset": {"num_folds": 10, "protocol": "random"}}})
    line = next(x for x in report.ckplus_results(tmp_path, results).splitlines()
                if x.startswith("| subject-independent"))
    assert "stale: the row changed since this was trained (fold_0: dataset.protocol: 'random'" in line
    assert "0.9234" not in line
    assert report.ckplus_tables_2_3(tmp_path, results) is None  # the full-budget row alone, and stale


def test_ckplus_tables_2_3_sit_together_with_the_full_budget_row_last(tmp_path):
    results = tmp_path / "experiments" / "results"
    assert report.ckplus_tables_2_3(tmp_path, results) is None  # nothing finished: no table

    def file_row(row_dir: Path, counts: list[tuple[int, int]], epochs: int) -> None:
        for k, (right, wrong) in enumerate(counts):
            write(row_dir / f"fold_{k}", {**fold_results(k, right, wrong), "epochs": epochs,
                                          "config": {"dataset": {"num_folds": 10}}})
        common.summarize_folds(row_dir, {"repeats": [f"fold_{k}" for k in range(len(counts))]})

    file_row(results / "table2_lr" / "epochs_20" / "ckplus-lr_1e-3", [(8, 2), (6, 4)], 20)
    file_row(results / "table3_ablation" / "epochs_20" / "ckplus-se0_bn0", [(9, 1), (9, 1)], 20)
    file_row(results / "ckplus_protocols" / "full" / "ckplus-kfold", [(10, 0), (9, 1)], 200)
    text = report.ckplus_tables_2_3(tmp_path, results)
    assert text.startswith("Tables 2 and 3, CK+ rows, at a reduced budget: 20 epochs of the paper's 200")
    lines = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[:2] for line in lines] == [
        ["| 2", "learning rate 0.01 (constant)"], ["| 2", "learning rate 0.001 (constant)"],
        ["| 2", "learning rate 0.0001 (constant)"], ["| 2", "learning rate 0.00001 (constant)"],
        ["| 2, 3", "Table 1 learning-rate schedule, SE ✓, BN ✓: the paper's configuration"],
        ["| 3", "SE ×, BN ×"], ["| 3", "SE ✓, BN ×"], ["| 3", "SE ×, BN ✓"],
        ["| 2, 3", "the paper's configuration at the full 200 epochs (Table 1 schedule, SE ✓, BN ✓)"]]
    lr = f"{np.mean([0.8, 0.6]):.4f} ± {np.std([0.8, 0.6], ddof=1):.4f} (2 folds)"
    row = "experiments/results/table2_lr/epochs_20/ckplus-lr_1e-3"
    assert lines[1].split(" | ")[2:] == [
        lr, lines[1].split(" | ")[3], "0.7000", "20", "0.9048",
        f"[summary.json]({row}/summary.json) [Fig. 8]({row}/confusion_matrix.png) |"]
    assert lines[0].split(" | ")[2:4] == ["not run yet", ""] and lines[0].endswith("| 0.9116 |  |")
    assert lines[5].split(" | ")[2] == "0.9000 ± 0.0000 (2 folds)"
    assert lines[8].split(" | ")[2:7] == [f"0.9500 ± {np.std([1.0, 0.9], ddof=1):.4f} (2 folds)",
                                          lines[8].split(" | ")[3], "0.9500", "200", "0.9932"]
    assert all((tmp_path / t).is_file() for t in link_targets(text))
    index = report.index(tmp_path, results / "README.md", results)
    assert index.index("CK+ at the paper's settings") < index.index("Tables 2 and 3, CK+ rows") \
        < index.index("| study | budget | results |")


def test_ferplus_lever_ablation_sits_in_the_readme_with_gains_seeds_and_cost(tmp_path):
    from experiments.paper import recipe_levers

    results = tmp_path / "experiments" / "results"
    base = results / recipe_levers.STUDY.name / "full"

    def run(row: str, seed: int, acc: float, f1: float, wall: float, cpu: str) -> None:
        write(base / f"ferplus-{row}" / f"seed_{seed}",
              {**fake_results(acc, "ferplus", split="validation", epochs=30, macro_f1=f1),
               "wall_time_seconds": wall, "host": {"cpu": cpu}})

    run("baseline", 0, 0.84, 0.60, 1000.0, "A")
    assert report.ferplus_levers(tmp_path, results) is None  # the baseline alone: no ablation yet
    run("baseline", 1, 0.86, 0.62, 1100.0, "B")
    run("flip", 0, 0.85, 0.63, 1500.0, "A")
    run("flip", 1, 0.88, 0.62, 1200.0, "C")
    run("ema", 1, 0.85, 0.64, 900.0, "B")
    text = report.ferplus_levers(tmp_path, results)
    assert "at 30 epochs (reduced budget), scored on the validation split" in text
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| Lever")}
    flip = rows["horizontal flip"]
    assert flip[2] == "0.8650 ± 0.0212 (n=2)"
    # Gains paired by seed: (0.85 - 0.84 + 0.88 - 0.86) / 2 = +1.50 points; macro F1 (0.03 + 0.00) / 2.
    assert flip[4:7] == ["+1.50 (2 seeds)", "+1.50 (2 seeds)", "1.50x"]  # wall: seed 0 only, both on A
    assert flip[7] == "1,350"
    assert rows["weight EMA"][4:7] == ["-1.00 (1 seed)", "+2.00 (1 seed)", "0.82x"]
    assert rows["none (the paper's recipe)"][4:7] == ["-", "-", "-"]
    assert rows["mixup"][2] == "not run yet"
    assert all((tmp_path / t).is_file() for t in link_targets(text) if t.endswith(".json"))
    index = report.index(tmp_path, results / "README.md", results)
    assert "FER+ recipe levers beyond the paper" in index
    assert index.index("FER+ recipe levers beyond the paper") < index.index("| study | budget | results |")


def test_a_reduced_budget_runs_the_full_settings_at_fewer_epochs_into_its_own_mode(tmp_path, capsys):
    common.main(table2_lr.STUDY, ["--dataset", "ckplus", "--manual_dir", "/data/ck", "--epochs", "25",
                                  "--rows", "table1", "--dry_run", "--scratch", str(tmp_path)])
    (cmd,) = capsys.readouterr().out.splitlines()
    assert "experiments.paper.ckplus_cv --config configs/ckplus.py" in cmd
    assert f"--workdir {tmp_path}/table2_lr/epochs_25/ckplus-table1" in cmd
    assert "--config.num_epochs=25" in cmd and "--config.optimizer.schedule=table1" in cmd
    with pytest.raises(SystemExit):
        common.main(table2_lr.STUDY, ["--quick", "--epochs", "25", "--dry_run"])

    results = tmp_path / "results"
    for mode, acc in (("epochs_25", 0.8), ("epochs_100", 0.85), ("full", 0.9), ("quick", 0.5)):
        for k in range(2):
            write(results / "table2_lr" / mode / "ckplus-table1" / f"fold_{k}",
                  fake_results(acc, "ckplus", epochs=int(mode.split("_")[-1]) if "_" in mode else 4))
    assert common.modes(results / "table2_lr") == ["full", "epochs_100", "epochs_25", "quick"]
    text = common.study_table(table2_lr.STUDY, "epochs_25", results_root=results)
    assert text.startswith("## Table 2: learning rate (reduced: 25 epochs)")
    assert "Reduced budget: every row at 25 epochs instead of the full budget's" in text
    assert "`python -m experiments.paper.table2_lr --epochs 25 --dataset ckplus --manual_dir DIR" in text
    assert common.write_table(table2_lr.STUDY, "epochs_25", results_root=results).is_file()
    index = report.index(tmp_path, results / "README.md", results)
    assert "| Table 2: learning rate | reduced: 25 epochs | [table](results/table2_lr/epochs_25/table.md) |" \
        in index
    assert index.index("| full |") < index.index("reduced: 100 epochs") < index.index("reduced: 25") \
        < index.index("| quick |")
