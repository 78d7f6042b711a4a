"""What the studies share: the run budgets, a runner that trains one table row, and markdown tables.

A study is a list of `Row`s, each a set of config overrides. `main(study)` trains every row with
`python -m fermsca.main` in a scratch workdir (checkpoints stay there, so a stopped full run resumes
when the command is repeated), copies results.json and the PNG figures to

    experiments/results/<study>/<quick|full|epochs_N>/<dataset>-<row>/[<fold>/]

and rewrites `table.md` beside them. On CK+ every row is repeated over the 10 test folds (either
protocol is k-fold), and the table gives mean +- sample std over the folds.

`--lanes N` trains up to N runs at once, each pinned to its own share of the CPUs (`lane_cores`): on a
2-core CPU two one-core runs train 1.10x the images per second of one two-core run
(experiments/perf/README.md, "Two runs side by side").
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import functools
import importlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "results"
MODES = ("quick", "full")
DATASETS = ("synthetic_faces", "ferplus", "ckplus")

CONFIG_FILES = {
    "synthetic_faces": "configs/default.py",
    "ferplus": "configs/ferplus.py",
    "ckplus": "configs/ckplus.py",
}
PAPER_EPOCHS = 200  # section 3.3; configs/ferplus.py and configs/ckplus.py
# Full: the paper's budget (section 3.3: 200 epochs, Table 1 schedule, batch 128 FER+ / 7 CK+), as in
# configs/ferplus.py and configs/ckplus.py; the synthetic set gets the FER+ budget.
FULL_BUDGET = {
    "synthetic_faces": {"num_epochs": 200, "batch_size": 128},
    "ferplus": {},
    "ckplus": {},
}
# Quick: minutes per row on 2 CPU cores. A narrow FERNet, 4 epochs (Table 1 boundaries scale with
# num_epochs), and for FER+ the first 4096 training images.
_QUICK_MODEL = {"model.stem_width": 16, "model.widths": (16, 32, 64), "num_epochs": 4}
QUICK_BUDGET = {
    "synthetic_faces": {**_QUICK_MODEL, "batch_size": 64},
    "ferplus": {**_QUICK_MODEL, "batch_size": 64, "dataset.train_subset": 4096},
    "ckplus": {**_QUICK_MODEL},
}
DATASET_TITLES = {"synthetic_faces": "synthetic faces", "ferplus": "FER+", "ckplus": "CK+"}

QUICK_NOTE = (
    "Quick runs check that every row trains end to end on a tiny budget (one seed, a narrow network, "
    "a few epochs). Differences between their rows are not evidence for or against the paper's "
    "claims; that needs the full runs."
)


REDUCED_PREFIX = "epochs_"  # a reduced budget's mode: epochs_<N> (`--epochs N`)


def reduced_mode(epochs: int) -> str:
    return f"{REDUCED_PREFIX}{epochs}"


def reduced_epochs(mode: str) -> int | None:
    """N of a reduced budget's mode `epochs_N`; None for any other mode."""
    digits = mode[len(REDUCED_PREFIX):]
    return int(digits) if mode.startswith(REDUCED_PREFIX) and digits.isdigit() else None


def modes(study_dir: Path) -> list[str]:
    """The modes with a folder under `study_dir`, in table order: full, the reduced budgets
    (most epochs first), quick."""
    reduced = sorted((d.name for d in study_dir.glob(f"{REDUCED_PREFIX}*")
                      if d.is_dir() and reduced_epochs(d.name) is not None),
                     key=lambda m: -reduced_epochs(m))
    return ["full", *reduced, "quick"]


def mode_label(mode: str) -> str:
    """How tables name a mode: full, quick, or "reduced: <N> epochs"."""
    epochs = reduced_epochs(mode)
    return mode if epochs is None else f"reduced: {epochs} epochs"


def reduced_note(mode: str) -> str:
    epochs = reduced_epochs(mode)
    if epochs is None:
        return ""
    return (f"Reduced budget: every row at {epochs} epochs instead of the full "
            "budget's (the paper's 200 for its tables), Table 1's boundaries scaled to it; "
            "everything else as the full budget. Rows compare with each other, not with the "
            "paper's 200-epoch numbers.")


class RunError(RuntimeError):
    """A training run failed or did not finish."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a study: a name (its directory), its label cells and its config overrides.

    `paper` holds published accuracies by key of `Study.paper_columns` (e.g. "ferplus").
    `same_as` = (study, row, label): another study's row of the same configuration, whose results
    the table shows (saying so, with `label`) where this row has none of its own in that mode, so
    the configuration is trained once.
    `against`: the row this one's gain is measured against, where not the study's baseline (e.g. a
    costly lever trained with a speed lever on, against that speed lever's row).
    """

    name: str
    cells: tuple[str, ...]
    overrides: Mapping[str, Any]
    paper: Mapping[str, float] = dataclasses.field(default_factory=dict)
    same_as: tuple[str, str, str] | None = None
    against: str | None = None


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    title: str
    row_headers: tuple[str, ...]
    rows: tuple[Row, ...]
    datasets: tuple[str, ...] = DATASETS
    default_dataset: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"quick": "synthetic_faces", "full": "ferplus"})
    paper_columns: tuple[tuple[str, str], ...] = ()
    note: str = ""
    # Over the mode's budget, e.g. a study of levers at fewer epochs than the paper's 200.
    budget: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    # Seeds every non-CK+ row is repeated over (`seed_k/`); empty: one run with the config's seed.
    seeds: tuple[int, ...] = ()
    # A row the others are measured against: the table then gives each row's gain in accuracy and
    # macro F1 over it, paired by seed (`gain_cells`), and its wall time as a multiple of it.
    baseline: str | None = None

    def __post_init__(self):
        names = [row.name for row in self.rows]
        for row in self.rows:
            if row.against is not None and (self.baseline is None or row.against not in names
                                            or row.against == row.name):
                raise ValueError(f"study {self.name!r}: row {row.name!r} is measured against "
                                 f"{row.against!r}, which is not one of its rows {names} "
                                 "(or the study has no baseline)")


# ----------------------------------------------------------------------------------------------
# Numbers and markdown


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); std is None for fewer than two values."""
    if not values:
        raise ValueError("mean_std of no values")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def format_mean_std(values: Sequence[float], digits: int = 4) -> str:
    """`0.8123` for one value, `0.8123 ± 0.0150 (n=10)` for several."""
    mean, std = mean_std(values)
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={len(values)})"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are str()-ed and `|` in them escaped."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells, expected {len(headers)}: {row}")
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def link(text: str, target: Path, relative_to: Path) -> str:
    """A markdown link to `target`, relative to the directory `relative_to`."""
    return f"[{text}]({Path(os.path.relpath(target, relative_to)).as_posix()})"


# ----------------------------------------------------------------------------------------------
# Results on disk


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def row_results(row_dir: Path) -> list[Path]:
    """The results.json files of one row: its own, or one per repeat (fold_0/, fold_1/, ...)."""
    own = row_dir / "results.json"
    if own.is_file():
        return [own]
    if not row_dir.is_dir():
        return []
    return sorted(row_dir.glob("*/results.json"), key=_natural_key)


def load_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a table shows of one row: accuracies over its repeats and where they came from."""

    paths: tuple[Path, ...]
    accuracy: tuple[float, ...]
    macro_f1: tuple[float, ...]
    best_validation_accuracy: tuple[float, ...]
    evaluated_split: str
    epochs: float
    wall_seconds: tuple[float, ...]
    cpus: tuple[str | None, ...] = ()  # per repeat: the CPU it ran on (results' host.cpu), if named
    # Where the results were trained with other values than the row's `expected_config` now
    # (`config_mismatches`): the row changed since, and the tables show no numbers for it.
    stale: tuple[str, ...] = ()


def summarize(results: Sequence[Mapping[str, Any]], paths: Sequence[Path]) -> Summary:
    """Summary of the results.json dicts of one row (one per repeat)."""
    if not results:
        raise ValueError("summarize needs at least one results dict")
    for r, p in zip(results, paths, strict=True):
        if r.get("status", "completed") != "completed":
            raise RunError(f"{p}: status is {r.get('status')!r}, expected 'completed'")
    splits = sorted({r["evaluated_split"] for r in results})
    epochs = sorted({float(r["epochs"]) for r in results})

    def best(r):
        ev = r["evaluations"]
        return ev.get("best", ev.get("last"))

    return Summary(
        paths=tuple(paths),
        accuracy=tuple(float(r["accuracy"]) for r in results),
        macro_f1=tuple(float(best(r)["macro_f1"]) for r in results),
        best_validation_accuracy=tuple(float(r["best_validation_accuracy"]) for r in results
                                       if r.get("best_validation_accuracy") is not None),
        evaluated_split="/".join(splits),
        epochs=epochs[0] if len(epochs) == 1 else float("nan"),
        wall_seconds=tuple(float(r["wall_time_seconds"]) for r in results
                           if r.get("wall_time_seconds") is not None),
        cpus=tuple(r.get("host", {}).get("cpu") for r in results),
    )


_UNSET = object()

# Fields that say where the data is or how fast a run goes, not what it computes: never compared.
NOT_COMPARED = frozenset({
    "dataset.manual_dir", "dataset.data_dir", "dataset.packed_file", "dataset.rebuild", "dataset.fold",
    "model.conv_impl", "data_on_device", "steps_per_dispatch", "log_every_steps",
    "checkpoint_every_epochs", "checkpoint_every_steps", "keep_checkpoints", "async_checkpoints"})


def config_mismatches(overrides: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """The fields of `overrides` (dotted names) whose value in a run's recorded config (results.json's
    nested "config") differs, one "field: value in the results, value asked" line each. A string
    asked of a non-string field (`--set`) is read as a Python literal. Not compared: `NOT_COMPARED`,
    a field the record lacks (it predates the field), and a string that is no literal."""

    def plain(value: Any) -> Any:
        return tuple(plain(v) for v in value) if isinstance(value, (list, tuple)) else value

    out = []
    for field, asked in overrides.items():
        if field in NOT_COMPARED:
            continue
        node: Any = config
        for part in field.split("."):
            node = node.get(part, _UNSET) if isinstance(node, Mapping) else _UNSET
        if node is _UNSET:
            continue
        if isinstance(asked, str) and not isinstance(node, str):
            try:
                asked = ast.literal_eval(asked)
            except (ValueError, SyntaxError):
                continue
        if plain(node) != plain(asked):
            out.append(f"{field}: {plain(node)!r} in the results, {plain(asked)!r} asked")
    return out


@functools.cache
def config_defaults(config_file: str) -> dict[str, Any]:
    """Every field of a config file (`CONFIG_FILES`) by dotted name, as its get_config() sets it."""
    from fermsca import config_schema

    module = importlib.import_module("configs." + Path(config_file).stem)
    return config_schema.flatten(module.get_config())


def mode_budget(study: Study, mode: str, dataset: str) -> dict[str, Any]:
    """The overrides every row of `study` trains with in `mode` (`QUICK_BUDGET`, `FULL_BUDGET`, the
    study's own `budget`, and a reduced mode's epochs)."""
    quick = mode == "quick"
    budget = {**(QUICK_BUDGET if quick else FULL_BUDGET)[dataset],
              **study.budget.get("quick" if quick else "full", {})}
    if reduced_epochs(mode) is not None:
        budget["num_epochs"] = reduced_epochs(mode)
    return budget


def expected_config(study: Study, row: Row, mode: str, dataset: str) -> dict[str, Any]:
    """What `row`'s results must record for every field any row of `study` sets: the row's own
    value, else the mode's budget's, else the config file's default. So a lever dropped from a row
    (say `wider` losing its bfloat16) shows as well as a changed one."""
    fields = {f for r in study.rows for f in r.overrides}
    budget = mode_budget(study, mode, dataset)
    defaults = config_defaults(CONFIG_FILES[dataset])
    out = {}
    for field in sorted(fields):
        for source in (row.overrides, budget, defaults):
            if field in source:
                out[field] = source[field]
                break
    return out


def row_summary(row_dir: Path, expected: Mapping[str, Any] | None = None) -> Summary | None:
    """The `summarize` of a row directory's results (`row_results`); None where it has none. With
    `expected` (`expected_config`), results trained with other values are marked `stale`."""
    paths = row_results(row_dir)
    if not paths:
        return None
    results = [load_json(p) for p in paths]
    summary = summarize(results, paths)
    if expected is None:
        return summary
    stale = [f"{p.parent.name if len(paths) > 1 else p.name}: {m}"
             for p, r in zip(paths, results, strict=True)
             for m in config_mismatches(expected, r.get("config", {}))]
    return dataclasses.replace(summary, stale=tuple(stale))


PROTOCOLS = {  # CK+ config.dataset.protocol, as the tables name it
    "kfold": "subject-independent {folds}-fold cross-validation",
    "random": "image-level random {folds}-fold cross-validation",
    "all": "trained on every image",
}


def setup_line(results: Mapping[str, Any]) -> str:
    """The budget of a run in one line, from its results.json: data sizes, model width, precision,
    batch, epochs, devices."""
    cfg = results.get("config", {})
    model = cfg.get("model", {})
    sizes = results.get("dataset", {}).get("split_sizes", {})
    parts = []
    if results.get("dataset", {}).get("name") == "ckplus" and "dataset" in cfg:
        protocol = cfg["dataset"].get("protocol")
        folds = cfg["dataset"].get("num_folds")
        parts.append(PROTOCOLS.get(protocol, f"protocol {protocol}").format(folds=folds))
    if sizes:
        parts.append(" / ".join(f"{n:,} {k}" for k, n in sizes.items()) + " images")
    if model:
        parts.append(f"widths {tuple(model.get('widths', ()))}, stem {model.get('stem_width')}")
        if model.get("conv_dtype", "float32") != "float32":
            parts.append(f"{model['conv_dtype']} convolution operands")
    if "batch_size" in cfg:
        parts.append(f"batch {cfg['batch_size']}")
    if "epochs" in results:
        parts.append(f"{results['epochs']:g} epochs")
    if "device_kind" in results:
        parts.append(f"{results.get('device_count', 1)} x {results['device_kind']}")
    return "; ".join(parts)


def _fmt_seconds(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{sum(values) / len(values):.0f}"


def _opt(values: Sequence[float]) -> str:
    return format_mean_std(values) if values else "-"


@dataclasses.dataclass(frozen=True)
class Gain:
    """A row against the baseline over the seeds both have (`seeds`): mean accuracy and macro F1
    differences (fractions) and the row's total wall time over the baseline's, over the seeds whose
    two runs ran on the same CPU (None if there are none: machines of one class differ 2-4x)."""

    seeds: tuple[str, ...]
    accuracy: float
    macro_f1: float
    wall_ratio: float | None


def paired_gain(row: Summary, base: Summary) -> Gain | None:
    """`row` against `base`, paired by seed (the runs of the same repeat directory, `seed_k`); None
    where they share no seed. Wall times are paired only where both runs name the same CPU (or
    neither does: records from before results named it)."""
    def by_seed(summary: Summary) -> dict[str, tuple[float, float, float | None, str | None]]:
        walls = summary.wall_seconds if len(summary.wall_seconds) == len(summary.paths) else ()
        cpus = summary.cpus if len(summary.cpus) == len(summary.paths) else ()
        return {p.parent.name: (a, f, walls[i] if walls else None, cpus[i] if cpus else None)
                for i, (p, a, f) in
                enumerate(zip(summary.paths, summary.accuracy, summary.macro_f1, strict=True))}

    ours, theirs = by_seed(row), by_seed(base)
    shared = tuple(sorted(set(ours) & set(theirs)))
    if not shared:
        return None
    walls = [(ours[k][2], theirs[k][2]) for k in shared
             if ours[k][3] == theirs[k][3] and ours[k][2] is not None and theirs[k][2] is not None]
    return Gain(shared, sum(ours[k][0] - theirs[k][0] for k in shared) / len(shared),
                sum(ours[k][1] - theirs[k][1] for k in shared) / len(shared),
                sum(w for w, _ in walls) / sum(w for _, w in walls) if walls else None)


def gain_cells(row: Summary, base: Summary | None, against: str | None = None) -> list[str]:
    """The table's gain cells of a row (`paired_gain`): accuracy and macro F1 gains in percentage
    points, signed, with how many seeds were paired (and `against`, naming the reference where it
    is not the baseline), and the wall time as a multiple of the reference's; "-" where no seed is
    shared."""
    gain = paired_gain(row, base) if base is not None else None
    if gain is None:
        return ["-", "-", "-"]
    n = len(gain.seeds)
    seeds = f"({n} seed{'s' if n > 1 else ''}{f', against {against}' if against else ''})"
    return [f"{100 * gain.accuracy:+.2f} {seeds}", f"{100 * gain.macro_f1:+.2f} {seeds}",
            "-" if gain.wall_ratio is None else f"{gain.wall_ratio:.2f}x"]


def reference_row(study: Study, row: Row) -> str | None:
    """The name of the row `row`'s gain is measured against: its own `against`, else the study's
    baseline; None for the baseline itself."""
    if row.name == study.baseline:
        return None
    return row.against or study.baseline


def rows_within(study: Study, mode: str, dataset: str, points: float, names: Sequence[str],
                results_root: Path = RESULTS) -> list[str]:
    """Of `names`, the study's baseline row and the rows whose accuracy gain over their reference
    (`reference_row`), paired over the seeds both have filed (`paired_gain`), is within +-`points`;
    a row with no shared seed yet is kept (nothing is known of it). For a second seed only where
    one seed's gain is too small to trust."""
    rows = {row.name: row for row in study.rows}

    def summary(row_name: str) -> Summary | None:  # stale results are as good as none
        s = row_summary(results_root / study.name / mode / f"{dataset}-{row_name}",
                        expected_config(study, rows[row_name], mode, dataset))
        return None if s is None or s.stale else s

    if summary(study.baseline) is None:
        raise RunError(f"{study.name} ({mode}, {dataset}): the {study.baseline!r} row has no results "
                       "yet (or only stale ones), so no gain is known")
    kept = set()
    for name in names:
        reference_name = reference_row(study, rows[name])
        ours = summary(name) if reference_name is not None else None
        reference = summary(reference_name) if ours is not None else None
        gain = paired_gain(ours, reference) if reference is not None else None
        # compared in rounded points, as the table shows them
        if gain is None or abs(round(100 * gain.accuracy, 6)) <= points:
            kept.add(name)
            if reference_name is not None and reference_name != study.baseline:
                kept.add(reference_name)  # its next seed pairs with the reference's
    return [row.name for row in study.rows if row.name in kept]


def study_table(study: Study, mode: str, relative_to: Path | None = None,
                results_root: Path = RESULTS, heading_level: int = 2) -> str | None:
    """Markdown for every dataset of `study` with results in `mode`; None when there are none.

    Links are relative to `relative_to` (default: the study's mode directory, where table.md is).
    """
    base = results_root / study.name / mode
    relative_to = base if relative_to is None else relative_to
    blocks = []
    for dataset in study.datasets:
        if not any(row_results(base / f"{dataset}-{row.name}") for row in study.rows):
            continue  # rows shown from another study alone do not make a table
        row_dirs, summaries = row_summaries(study, mode, dataset, results_root)
        reference = fresh(summaries).get(study.baseline)
        gains = (["Gain: acc. (points)", "Gain: macro F1 (points)", "Wall vs baseline"]
                 if reference else [])
        headers = [*study.row_headers, "Accuracy", "Macro F1", *gains, "Best val. acc.",
                   "Evaluated on", "Epochs", "Wall s / run", *(h for _, h in study.paper_columns),
                   "Results"]
        lines, setup = [], None
        for row in study.rows:
            s = summaries.get(row.name)
            paper = [f"{row.paper[k]:.4f}" if k in row.paper else "-" for k, _ in study.paper_columns]
            if s is None or s.stale:
                lines.append([*row.cells, stale_cell(s) if s else "not run", "",
                              *([""] * len(gains)), "", "", "", "", *paper, ""])
                continue
            paths = s.paths
            setup = setup or setup_line(load_json(paths[0]))
            gain = [] if reference is None else row_gain_cells(study, row, s, summaries)
            if len(paths) == 1:
                links = link("results.json", paths[0], relative_to)
            else:
                links = " ".join(link(p.parent.name.split("_")[-1], p, relative_to) for p in paths)
            if row_dirs[row.name] != base / f"{dataset}-{row.name}":
                links = f"{row.same_as[2]} (same configuration, run once): {links}"
            lines.append([*row.cells, format_mean_std(s.accuracy), format_mean_std(s.macro_f1), *gain,
                          _opt(s.best_validation_accuracy), s.evaluated_split,
                          f"{s.epochs:g}", _fmt_seconds(s.wall_seconds), *paper, links])
        command = f"python -m experiments.paper.{study.name}{' --quick' if mode == 'quick' else ''}"
        if reduced_epochs(mode) is not None:
            command += f" --epochs {reduced_epochs(mode)}"
        command += f" --dataset {dataset}"
        if dataset != "synthetic_faces":
            command += " --manual_dir DIR [--data_dir DIR]"
        hashes = "#" * (heading_level + 1)
        pooled = pooled_table(study, [(row, row_dirs[row.name]) for row in study.rows
                                      if not (row.name in summaries and summaries[row.name].stale)],
                              relative_to)
        blocks.append(f"{hashes} {DATASET_TITLES[dataset]}\n\n`{command}`\n\n"
                      + (f"Setup: {setup}.\n\n" if setup else "") + markdown_table(headers, lines)
                      + (f"\n{pooled}" if pooled else ""))
    if not blocks:
        return None
    head = f"{'#' * heading_level} {study.title} ({mode_label(mode)})\n\n"
    notes = [n for n in (study.note, QUICK_NOTE if mode == "quick" else "", reduced_note(mode)) if n]
    if notes:
        head += "\n\n".join(notes) + "\n\n"
    return head + "\n".join(blocks)


def row_gain_cells(study: Study, row: Row, summary: Summary, summaries: Mapping[str, Summary]
                   ) -> list[str]:
    """`gain_cells` of a row against its reference (`reference_row`) among `summaries`, the
    reference named where it is not the baseline; "-" cells for the baseline itself."""
    reference = reference_row(study, row)
    if reference is None:
        return ["-", "-", "-"]
    label = None
    if reference != study.baseline:
        label = next(r.cells[0] for r in study.rows if r.name == reference)
    return gain_cells(summary, fresh(summaries).get(reference), label)


def fresh(summaries: Mapping[str, Summary]) -> dict[str, Summary]:
    """`summaries` without the stale ones."""
    return {name: s for name, s in summaries.items() if not s.stale}


def row_dir(row: Row, results_root: Path, study: str, mode: str, dataset: str) -> Path:
    """Where `row`'s results are: its own directory, or its `same_as` row's where only that one has
    results in `mode`."""
    own = results_root / study / mode / f"{dataset}-{row.name}"
    if row.same_as is None or row_results(own):
        return own
    other = results_root / row.same_as[0] / mode / f"{dataset}-{row.same_as[1]}"
    return other if row_results(other) else own


def row_summaries(study: Study, mode: str, dataset: str,
                  results_root: Path = RESULTS) -> tuple[dict[str, Path], dict[str, Summary]]:
    """Each row's results directory (`row_dir`) and, for the rows with results, their summary (marked
    `stale` where the row's fields changed since they were trained)."""
    rows = {row.name: row for row in study.rows}
    row_dirs = {row.name: row_dir(row, results_root, study.name, mode, dataset) for row in study.rows}
    summaries = {name: s for name, d in row_dirs.items()
                 if (s := row_summary(d, expected_config(study, rows[name], mode, dataset))) is not None}
    return row_dirs, summaries


def stale_cell(summary: Summary) -> str:
    """What a table shows instead of a stale row's numbers."""
    return ("stale: the row changed since this was trained (" + "; ".join(summary.stale)
            + "); train it again with --rerun")


def pooled_table(study: Study, rows: Sequence[tuple[Row, Path]], relative_to: Path) -> str | None:
    """Per-class accuracy of the cross-validated rows (a summary.json beside their folds): the
    test folds' confusion matrices summed (the paper's Fig. 8), linked to its figure; None when no
    row has one."""
    found = [(row, d, load_json(d / "summary.json")) for row, d in rows if (d / "summary.json").is_file()]
    if not found:
        return None
    names = list(found[0][2]["pooled"]["per_class_accuracy"])
    lines = []
    for row, row_dir, summary in found:
        pooled = summary["pooled"]
        figure = row_dir / "confusion_matrix.png"
        per_class = [pooled["per_class_accuracy"][n] for n in names]  # None: no image of the class
        lines.append([*row.cells, *("-" if v is None else f"{v:.3f}" for v in per_class),
                      f"{pooled['accuracy']:.4f}", pooled["num_examples"],
                      link("figure", figure, relative_to) if figure.is_file() else "-"])
    return ("Per-class accuracy over the test folds pooled (their confusion matrices summed, as in "
            "the paper's Fig. 8):\n\n"
            + markdown_table([*study.row_headers, *names, "Pooled acc.", "Images", "Confusion matrix"],
                             lines))


def write_table(study: Study, mode: str, results_root: Path = RESULTS) -> Path | None:
    text = study_table(study, mode, results_root=results_root, heading_level=1)
    if text is None:
        return None
    path = results_root / study.name / mode / "table.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------
# Running


def format_value(value: Any) -> str:
    """A config value as `--config.<field>=` expects it: tuples as `(a,b)`, bools as True/False."""
    if isinstance(value, tuple | list):
        return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def config_flags(overrides: Mapping[str, Any]) -> list[str]:
    """One `--config.<field>=<value>` per field (a tuple field given twice would concatenate)."""
    return [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]


def repeats(row: Row, dataset: str, folds: Sequence[int],
            sets: Mapping[str, Any] | None = None, seeds: Sequence[int] = ()) -> list[tuple[str, dict]]:
    """The runs of a row: one, one per seed (`seeds`), or on CK+ one per test fold (either protocol
    is k-fold)."""
    if dataset != "ckplus":
        return [(f"seed_{k}", {"seed": k}) for k in seeds] or [("", {})]
    protocol = {**row.overrides, **(sets or {})}.get("dataset.protocol", "kfold")
    if protocol not in ("kfold", "random"):
        raise ValueError(f"row {row.name}: dataset.protocol={protocol!r}; studies cross-validate CK+ "
                         "with 'kfold' or 'random' ('all' has no test folds)")
    return [(f"fold_{k}", {"dataset.fold": k}) for k in folds]


def lane_cores(cpus: Sequence[int], lanes: int) -> list[tuple[int, ...]]:
    """`cpus` (the CPUs this process may run on) split into `lanes` disjoint groups of consecutive
    CPUs, as even as they go (the first groups take one more where they do not divide)."""
    cpus = sorted(cpus)
    if lanes < 1 or lanes > len(cpus):
        raise ValueError(f"--lanes {lanes}: between 1 and the {len(cpus)} CPUs this process may use")
    size, extra = divmod(len(cpus), lanes)
    groups, start = [], 0
    for lane in range(lanes):
        end = start + size + (lane < extra)
        groups.append(tuple(cpus[start:end]))
        start = end
    return groups


def pinned(cmd: list[str], cpus: Sequence[int] | None) -> list[str]:
    """`cmd`, run on `cpus` only (None: unchanged): a Python trampoline sets the CPU affinity, which
    the command and its children inherit, and execs it (no `taskset` needed, and safe from threads,
    unlike `subprocess`'s preexec_fn)."""
    if not cpus:
        return list(cmd)
    set_affinity = (f"import os, sys; os.sched_setaffinity(0, {sorted(cpus)!r}); "
                    "os.execvp(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", set_affinity, *cmd]


def _run_logged(cmd: list[str], workdir: Path, name: str, *, rerun: bool, dry_run: bool,
                cpus: Sequence[int] | None = None) -> float | None:
    """Prints and runs a training command (on `cpus` only, when given) with its output in
    `<workdir>.log` (appended: a resumed run keeps the earlier attempts); returns the seconds it
    took, None for a dry run. A pre-empted (exit 75) or failed run is a RunError that says how to
    resume or where to look."""
    where = f"[CPUs {','.join(map(str, cpus))}] " if cpus else ""
    print(f"{where}$ " + shlex.join(cmd), flush=True)
    if dry_run:
        return None
    cmd = pinned(cmd, cpus)
    if rerun and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir.with_name(workdir.name + ".log")
    start = time.time()
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.time() - start
    if proc.returncode == 75:  # fermsca.cli.EXIT_PREEMPTED: a checkpoint was saved
        raise RunError(f"{name}: pre-empted after {elapsed:.0f} s; repeat the command to resume "
                       f"from {workdir}. Log: {log_path}")
    if proc.returncode:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise RunError(f"{name}: exited with {proc.returncode} after {elapsed:.0f} s; workdir "
                       f"{workdir}, log {log_path}:\n{tail}")
    return elapsed


def filed_before(dest: Path, batch: Sequence[str] | None, rerun: bool) -> list[Path]:
    """The results filed in a row's directory that a new run of it keeps: its results.json (a
    run's, `batch` None) or its folds (`batch`: the folds this run trains), less what --rerun
    replaces."""
    if batch is None:
        return [] if rerun or not (dest / "results.json").is_file() else [dest / "results.json"]
    return [p for p in row_results(dest) if not (rerun and p.parent.name in batch)]


def check_filed(row_path: str, filed: Sequence[Path], overrides: Mapping[str, Any]) -> None:
    """Refuses (RunError) results filed for a row that were trained with other values of the
    fields it sets now (`config_mismatches`), instead of calling them done or pooling new folds
    with them."""
    for path in filed:
        mismatches = config_mismatches(overrides, load_json(path).get("config", {}))
        if mismatches:
            raise RunError(f"{row_path}: {path} was trained with another configuration than this "
                           f"row's now ({'; '.join(mismatches)}); --rerun to train it again")


def train_row(study: str, mode: str, row_path: str, config_file: str, overrides: Mapping[str, Any],
              *, scratch: Path, rerun: bool = False, keep_workdir: bool = False,
              dry_run: bool = False, results_root: Path = RESULTS,
              cpus: Sequence[int] | None = None, expected: Mapping[str, Any] | None = None
              ) -> Path | None:
    """Trains one row (or one fold of it) unless its results are already there; returns their path.

    The workdir is `scratch/<study>/<mode>/<row_path>`; after a completed run its results.json and
    PNGs are copied to `results_root/<study>/<mode>/<row_path>/` and the workdir is deleted.
    Results already there must match `overrides` and `expected` (`check_filed`).
    """
    dest = results_root / study / mode / row_path
    filed = filed_before(dest, None, rerun)
    if filed:
        check_filed(row_path, filed, {**(expected or {}), **overrides})
        print(f"{row_path}: already done ({filed[0]}); --rerun to train again")
        return filed[0]
    workdir = scratch / study / mode / row_path
    cmd = [sys.executable, "-m", "fermsca.main", "--config", config_file, "--workdir", str(workdir),
           *config_flags(overrides)]
    elapsed = _run_logged(cmd, workdir, f"{study}/{mode}/{row_path}", rerun=rerun, dry_run=dry_run,
                          cpus=cpus)
    if elapsed is None:
        return None
    produced = workdir / "results.json"
    if not produced.is_file():
        raise RunError(f"{study}/{mode}/{row_path}: no results.json in {workdir} (preempted?); "
                       f"repeat the command to resume")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in [produced, *sorted(workdir.glob("*.png"))]:
        shutil.copy2(f, dest / f.name)
    if not keep_workdir:
        shutil.rmtree(workdir)
    r = load_json(dest / "results.json")
    print(f"{row_path}: {r['evaluated_split']} accuracy {r['accuracy']:.4f} in {elapsed:.0f} s "
          f"-> {dest / 'results.json'}", flush=True)
    return dest / "results.json"


def train_folds_row(study: str, mode: str, row_path: str, config_file: str, overrides: Mapping[str, Any],
                    folds: Sequence[int], *, scratch: Path, rerun: bool = False, keep_workdir: bool = False,
                    dry_run: bool = False, results_root: Path = RESULTS,
                    cpus: Sequence[int] | None = None, expected: Mapping[str, Any] | None = None
                    ) -> list[Path] | None:
    """Trains the CK+ folds of one row together (`experiments.paper.ckplus_cv`, the folds vmapped in
    one process), unless every fold's results are already there; returns their paths.

    The study's workdir is `scratch/<study>/<mode>/<row_path>` (it resumes there from its last
    epoch); when it completes, each fold's results.json goes to `results_root/.../<row_path>/fold_k/`
    and its summary.json and summed confusion matrix beside them.
    """
    dest = results_root / study / mode / row_path
    names = [f"fold_{k}" for k in folds]
    done = [dest / n / "results.json" for n in names]
    # The folds filed before, which this batch joins in the row's summary, must match it (with
    # --rerun, the batch's own folds are replaced, so only the others are checked).
    check_filed(row_path, filed_before(dest, names, rerun), {**(expected or {}), **overrides})
    if all(p.is_file() for p in done) and not rerun:
        print(f"{row_path}: already done ({dest}); --rerun to train again")
        return done
    workdir = scratch / study / mode / row_path
    cmd = [sys.executable, "-m", "experiments.paper.ckplus_cv", "--config", config_file,
           "--workdir", str(workdir), "--folds", ",".join(str(k) for k in folds),
           *config_flags({k: v for k, v in overrides.items() if k != "dataset.fold"})]
    elapsed = _run_logged(cmd, workdir, f"{study}/{mode}/{row_path}", rerun=rerun, dry_run=dry_run,
                          cpus=cpus)
    if elapsed is None:
        return None
    summary = workdir / "summary.json"
    if not summary.is_file():
        raise RunError(f"{study}/{mode}/{row_path}: no summary.json in {workdir}; repeat the "
                       "command to resume")
    for name in names:  # folds of earlier batches (`--folds 0-4`, then `5-9`) stay
        (dest / name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(workdir / name / "results.json", dest / name / "results.json")
    batch = {k: v for k, v in load_json(summary).items() if k in BATCH_FIELDS}
    s = summarize_folds(dest, batch)
    if not keep_workdir:
        shutil.rmtree(workdir)
    print(f"{row_path}: {s['evaluated_split']} accuracy {s['accuracy_mean']:.4f} ± "
          f"{s['accuracy_std']:.4f} over {len(s['repeats'])} folds (this batch: {len(names)}, "
          f"{elapsed:.0f} s) -> {dest}", flush=True)
    return done


def run_jobs(jobs: Sequence[Callable[..., Any]], lanes: int, after_each: Callable[[], Any],
             cpus: Sequence[int] | None = None) -> None:
    """Runs `jobs` (each called as job(cpus=...)) in order, up to `lanes` at once, each on one lane's
    CPUs (`lane_cores` of `cpus`, default this process's); `after_each()` runs after every job that
    succeeds, one at a time. With one lane the jobs run one after another on every CPU. After a
    failure no new job starts; the running ones finish, then the first failure is raised."""
    if lanes == 1:
        for job in jobs:
            job(cpus=None)
            after_each()
        return
    free = lane_cores(os.sched_getaffinity(0) if cpus is None else cpus, lanes)
    lock = threading.Lock()
    failures: list[BaseException] = []

    def work(job):
        with lock:
            if failures:
                return
            group = free.pop(0)
        try:
            job(cpus=group)
        except Exception as e:  # raised below, once the other lanes have finished
            with lock:
                failures.append(e)
                free.append(group)
            return
        with lock:
            free.append(group)
            after_each()

    with concurrent.futures.ThreadPoolExecutor(lanes) as pool:
        list(pool.map(work, jobs))
    if failures:
        raise failures[0]


# What a study's own summary.json says about the run that trained a batch of folds.
BATCH_FIELDS = ("repeats", "wall_time_seconds", "train_images_per_second", "device_kind",
                "convolutions", "steps_per_epoch")


def summarize_folds(row_dir: Path, batch: Mapping[str, Any]) -> dict:
    """summary.json and confusion_matrix.png (Fig. 8) of every fold_k/results.json in `row_dir`:
    mean +- std of the folds' accuracies and their confusion matrices summed
    (`fermsca.crossval.summarize`), and under "batches" each run that trained some of them (`batch`,
    the latest, replaces an earlier record of the same folds). Returns the summary."""
    from fermsca import crossval

    path = row_dir / "summary.json"
    batches = load_json(path).get("batches", []) if path.is_file() else []
    batches = [b for b in batches if b.get("repeats") != batch.get("repeats")] + [dict(batch)]
    folds = [load_json(p) for p in row_results(row_dir)]
    class_names = folds[0]["dataset"]["class_names"]
    summary = {**crossval.summarize(folds, class_names), "batches": batches}
    crossval.write_summary(str(row_dir), summary, class_names, folds[0]["dataset"]["name"])
    return summary


def parse_folds(text: str, num_folds: int) -> list[int]:
    """`all`, `3`, `0,2,5` or `0-4` -> fold indices in [0, num_folds)."""
    if text == "all":
        return list(range(num_folds))
    folds = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            folds += range(int(lo), int(hi) + 1)
        else:
            folds.append(int(part))
    bad = [k for k in folds if not 0 <= k < num_folds]
    if bad:
        raise ValueError(f"--folds {text}: {bad} outside [0, {num_folds})")
    return folds


def parse_seeds(text: str) -> list[int]:
    """`0,1` or `0-2` -> distinct non-negative seeds."""
    seeds = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        seeds += range(int(lo), int(hi) + 1) if sep else [int(part)]
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text}: expected distinct non-negative integers, e.g. 0,1 or 0-2")
    return seeds


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set batch_size=8")
        out[field.removeprefix("config.")] = value
    return out


def arg_parser(study: Study) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m experiments.paper.{study.name}", description=study.title)
    p.add_argument("--quick", action="store_true",
                   help="tiny budget for a CPU (default: the paper's budget, meant for a GPU)")
    p.add_argument("--epochs", type=int,
                   help="a reduced budget: the paper's settings at this many epochs (Table 1's "
                        "boundaries scaled); results go to <study>/epochs_<N>/")
    p.add_argument("--dataset", choices=study.datasets,
                   help=f"default: {study.default_dataset['quick']} with --quick, else "
                        f"{study.default_dataset['full']}")
    p.add_argument("--manual_dir", help="raw dataset files (FER+, CK+): dataset.manual_dir")
    p.add_argument("--data_dir", help="TFDS data dir: dataset.data_dir")
    p.add_argument("--folds", default="all",
                   help="CK+: test folds to run (either protocol): all, 0-4, 0,3")
    p.add_argument("--seeds", help="seeds to repeat every row over (not CK+): 0,1 or 0-2 (default: "
                                   + (",".join(map(str, study.seeds)) or "the config's seed, once") + ")")
    p.add_argument("--rows", help="comma-separated row names to run (default: all): "
                                  + ", ".join(r.name for r in study.rows))
    if study.baseline is not None:
        p.add_argument("--within", type=float, metavar="POINTS",
                       help=f"train only the rows whose accuracy gain over the {study.baseline!r} row "
                            "(or the row they are measured against), paired over the seeds already "
                            "filed, is within +-POINTS (and those reference rows): e.g. a second seed "
                            "only where one seed's gain is too small to trust")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="extra config override for every row, e.g. --set batch_size=8")
    p.add_argument("--scratch", default=os.path.join(tempfile.gettempdir(), "fermsca_experiments"),
                   help="where workdirs (checkpoints) live while a row trains")
    p.add_argument("--lanes", type=int, default=1,
                   help="train up to N runs (rows, seeds) at once, each pinned to its own 1/N of "
                        "the CPUs (on 2 cores, 2 lanes train 1.10x the images per second of 1)")
    p.add_argument("--keep_workdirs", action="store_true", help="keep checkpoints after a run")
    p.add_argument("--rerun", action="store_true", help="train rows that already have results")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    p.add_argument("--table_only", action="store_true", help="only rewrite table.md")
    return p


def main(study: Study, argv: Sequence[str] | None = None) -> None:
    parser = arg_parser(study)
    args = parser.parse_args(argv)
    if args.epochs is not None and (args.quick or args.epochs < 1):
        parser.error("--epochs takes a positive number of epochs and does not go with --quick")
    mode = "quick" if args.quick else (reduced_mode(args.epochs) if args.epochs else "full")
    dataset = args.dataset or study.default_dataset["quick" if args.quick else "full"]
    if args.table_only:
        path = write_table(study, mode)
        print(path or f"no {mode} results for {study.name} yet")
        return
    if dataset == "ckplus" and not args.manual_dir:
        parser.error("CK+ is not distributed with fermsca and is not built here: pass "
                     "--manual_dir=<folder with the CK+ files> (see fermsca/datasets/README.md)")
    try:
        sets = parse_sets(args.set)
        num_folds = int(sets.get("dataset.num_folds", 10))
        folds = parse_folds(args.folds, num_folds)
        seeds = parse_seeds(args.seeds) if args.seeds else list(study.seeds)
    except ValueError as e:
        parser.error(str(e))
    names = [r.name for r in study.rows]
    wanted = args.rows.split(",") if args.rows else names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        parser.error(f"unknown rows {unknown}; {study.name} has {names}")
    if getattr(args, "within", None) is not None:
        try:
            wanted = rows_within(study, mode, dataset, args.within, wanted)
        except RunError as e:
            parser.error(str(e))
        print(f"rows within ±{args.within:g} points of {study.baseline!r} (or of their reference "
              f"row), with those references: {', '.join(wanted)}", flush=True)
    if args.epochs:  # a reduced budget: the full one at fewer epochs
        full_epochs = mode_budget(study, "full", dataset).get("num_epochs", PAPER_EPOCHS)
        if args.epochs >= full_epochs:
            parser.error(f"--epochs {args.epochs}: a reduced budget needs fewer epochs than the full "
                         f"budget's {full_epochs} (run without --epochs for that)")
    budget = mode_budget(study, mode, dataset)
    data_flags = {k: v for k, v in (("dataset.manual_dir", args.manual_dir),
                                    ("dataset.data_dir", args.data_dir)) if v}
    cpus = None
    if args.lanes != 1:
        if not hasattr(os, "sched_getaffinity"):
            parser.error("--lanes pins runs to CPUs, which this platform does not offer (Linux does)")
        cpus = sorted(os.sched_getaffinity(0))
        try:
            lane_cores(cpus, args.lanes)
        except ValueError as e:
            parser.error(str(e))
    run_args = dict(scratch=Path(args.scratch), rerun=args.rerun, keep_workdir=args.keep_workdirs,
                    dry_run=args.dry_run)
    jobs, stale = [], []

    def check(row_path: str, batch: Sequence[str] | None, overrides: Mapping[str, Any]) -> None:
        dest = RESULTS / study.name / mode / row_path
        try:  # every stale row named before anything trains, not one by one hours apart
            check_filed(row_path, filed_before(dest, batch, args.rerun), {**expected, **overrides})
        except RunError as e:
            stale.append(str(e))

    for row in study.rows:
        if row.name not in wanted:
            continue
        expected = expected_config(study, row, mode, dataset)
        if dataset == "ckplus":  # the row's folds trained together, vmapped
            try:
                repeats(row, dataset, folds, sets)  # checks the protocol
            except ValueError as e:
                parser.error(str(e))
            overrides = {**budget, **row.overrides, **data_flags, **sets}
            check(f"{dataset}-{row.name}", [f"fold_{k}" for k in folds], overrides)
            jobs.append(functools.partial(train_folds_row, study.name, mode, f"{dataset}-{row.name}",
                                          CONFIG_FILES[dataset], overrides, folds, **run_args,
                                          expected=expected))
            continue
        for sub, extra in repeats(row, dataset, folds, sets, seeds):
            overrides = {**budget, **row.overrides, **extra, **data_flags, **sets}
            row_path = f"{dataset}-{row.name}" + (f"/{sub}" if sub else "")
            check(row_path, None, overrides)
            jobs.append(functools.partial(train_row, study.name, mode, row_path, CONFIG_FILES[dataset],
                                          overrides, **run_args, expected=expected))
    if stale:
        parser.error("results filed under another configuration than their rows' now:\n  "
                     + "\n  ".join(stale))
    start = time.time()
    run_jobs(jobs, args.lanes, (lambda: None) if args.dry_run else (lambda: write_table(study, mode)),
             cpus=cpus)
    if not args.dry_run:
        path = write_table(study, mode)
        print(f"{study.name} ({mode}) done in {time.time() - start:.0f} s; table: {path}")
