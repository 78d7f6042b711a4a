"""Gathers every study's results into markdown tables, each row linked to its results.json.

    python -m experiments.paper.report                      # print the tables
    python -m experiments.paper.report --readme README.md   # rewrite README.md's results index
                                                            # and experiments/results/README.md

With `--readme`, the README gets a short index (one line per study, linked to its table) and
`experiments/results/README.md` (`--tables`) every table. Only the text between
`<!-- results:begin -->` and `<!-- results:end -->` of the README is replaced; a README without both
markers is left alone and the tables are printed instead.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from experiments.paper import (
    ckplus_protocols,
    common,
    label_modes,
    loss_study,
    recipe_levers,
    scaling,
    table2_lr,
    table3_ablation,
    table4_compare,
)

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
TRAINING_STUDIES = (table2_lr.STUDY, table3_ablation.STUDY, loss_study.STUDY, label_modes.STUDY,
                    ckplus_protocols.STUDY, recipe_levers.STUDY)


def gather(relative_to: Path, results_root: Path = common.RESULTS, heading_level: int = 3,
           table4_sources: Sequence[str] = table4_compare.DEFAULT_SOURCES) -> str:
    """Every table with results (full before quick), links relative to `relative_to`."""
    parts = []
    for study in TRAINING_STUDIES:
        for mode in common.modes(results_root / study.name):
            text = common.study_table(study, mode, relative_to, results_root, heading_level)
            if text:
                parts.append(text)
    parts.append(table4_compare.markdown(relative_to, table4_sources, heading_level))
    for mode in ("full", "quick"):
        text = scaling.markdown(mode, relative_to, heading_level, results_root)
        if text:
            parts.append(text)
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


CKPLUS_PAPER = 0.9932  # Wang & Zhang 2023, Table 4 (protocol not stated)


def _summary_links(row_dir: Path, relative_to: Path) -> str:
    """Links to a cross-validated row's summary.json and, where drawn, its Fig. 8."""
    figure = row_dir / "confusion_matrix.png"
    return " ".join([common.link("summary.json", row_dir / "summary.json", relative_to),
                     *([common.link("Fig. 8", figure, relative_to)] if figure.is_file() else [])])


def _stale_cell(study: common.Study, row: common.Row, mode: str, row_dir: Path) -> str | None:
    """`common.stale_cell` of a CK+ row whose folds were trained under another configuration than
    the row's now (`common.expected_config`); None where they match or there are none."""
    s = common.row_summary(row_dir, common.expected_config(study, row, mode, "ckplus"))
    return common.stale_cell(s) if s is not None and s.stale else None


def ckplus_results(relative_to: Path, results_root: Path = common.RESULTS) -> str | None:
    """The CK+ headline: the paper's setup under both protocols (`ckplus_protocols`, full budget),
    side by side, from their summary.json files; None before either has finished."""
    rows, shown = [], False
    for row in ckplus_protocols.STUDY.rows:
        row_dir = results_root / ckplus_protocols.STUDY.name / "full" / f"ckplus-{row.name}"
        summary_path = row_dir / "summary.json"
        if not summary_path.is_file():
            rows.append([row.cells[0], "not finished yet", "", "", "", ""])
            continue
        shown = True  # a stale row too: the reader should see that it is stale
        stale = _stale_cell(ckplus_protocols.STUDY, row, "full", row_dir)
        if stale:
            rows.append([row.cells[0], stale, "", "", "", ""])
            continue
        s = common.load_json(summary_path)
        folds = [common.load_json(p) for p in common.row_results(row_dir)]
        epochs = {r["epochs"] for r in folds}
        num_folds = {r["config"]["dataset"]["num_folds"] for r in folds}
        rows.append([
            row.cells[0],
            f"**{s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f}** over {len(folds)} of "
            f"{'/'.join(map(str, sorted(num_folds)))} test folds",
            f"{s['pooled']['accuracy']:.4f} ({s['pooled']['num_examples']} images)",
            f"{s['macro_f1_mean']:.4f}",
            "/".join(f"{e:g}" for e in sorted(epochs)),
            _summary_links(row_dir, relative_to),
        ])
    if not shown:
        return None
    return ("CK+ at the paper's settings (configs/ckplus.py: batch 7, Table 1 schedule, cosine loss, the "
            "paper's augmentation, widths 64/128/256), k-fold cross-validation with the folds "
            "trained together (`python -m experiments.paper.ckplus_protocols --manual_dir DIR`). "
            "Each fold reports its final epoch on its test fold: nothing is selected on a test fold. "
            f"The paper reports {CKPLUS_PAPER:.2%} without naming its protocol. The protocols differ "
            "in what a test fold holds: subject-independent folds hold people the model never saw, "
            "while a random split by image puts near-identical frames of one sequence on both sides, "
            "so it partly measures recognising a seen face.\n\n"
            + common.markdown_table(["CK+ protocol", "Accuracy (mean ± std)", "Pooled accuracy",
                                     "Macro F1 (mean)", "Epochs", "Results"], rows))


def _ckplus_summary_cells(study: common.Study, row: common.Row, mode: str, row_dir: Path,
                          relative_to: Path) -> list[str] | None:
    """Accuracy, macro F1, pooled accuracy, epochs and links of a cross-validated CK+ row, from its
    summary.json and fold results; None where it has no summary yet, and a stale cell where its
    folds were trained under another configuration than the row's now."""
    summary_path = row_dir / "summary.json"
    if not summary_path.is_file():
        return None
    stale = _stale_cell(study, row, mode, row_dir)
    if stale:
        return [stale, "", "", "", ""]
    s = common.load_json(summary_path)
    folds = [common.load_json(p) for p in common.row_results(row_dir)]
    return [f"{s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f} ({len(folds)} folds)",
            f"{s['macro_f1_mean']:.3f}", f"{s['pooled']['accuracy']:.4f}",
            "/".join(f"{e:g}" for e in sorted({float(r['epochs']) for r in folds})),
            _summary_links(row_dir, relative_to)]


def ckplus_tables_2_3(relative_to: Path, results_root: Path = common.RESULTS) -> str | None:
    """The CK+ rows of Tables 2 (learning rate) and 3 (SE / BN) in one table per reduced budget
    (`--epochs N`), each closed by the paper's configuration at the full 200 epochs (the
    subject-independent protocol of `ckplus_results`), so a reader sees how far the reduced budget
    is from it; None before any row has finished."""
    studies = (table2_lr.STUDY, table3_ablation.STUDY)
    mode_names = sorted({m for study in studies for m in common.modes(results_root / study.name)
                         if common.reduced_epochs(m) is not None}, key=common.reduced_epochs,
                        reverse=True)
    kfold = next(r for r in ckplus_protocols.STUDY.rows if r.name == "kfold")
    full_cells = _ckplus_summary_cells(
        ckplus_protocols.STUDY, kfold, "full",
        results_root / ckplus_protocols.STUDY.name / "full" / "ckplus-kfold", relative_to)
    blocks = []
    for mode in mode_names:
        lines, shown = [], False
        for study, number in zip(studies, ("2", "3"), strict=True):
            for row in study.rows:
                if row.same_as is not None:
                    continue  # trained once, as the other table's row
                own = results_root / study.name / mode / f"ckplus-{row.name}"
                paper_config = row.overrides == {"optimizer.schedule": "table1"}
                if paper_config:
                    setting = "Table 1 learning-rate schedule, SE ✓, BN ✓: the paper's configuration"
                elif study is table2_lr.STUDY:
                    setting = f"learning rate {row.cells[0]}"
                else:
                    setting = f"SE {row.cells[0]}, BN {row.cells[1]}"
                cells = (_ckplus_summary_cells(study, row, mode, own, relative_to)
                         or ["not run yet", "", "", "", ""])
                shown = shown or cells[0] != "not run yet"
                lines.append(["2, 3" if paper_config else number, setting, *cells[:-1],
                              f"{row.paper['ckplus']:.4f}", cells[-1]])
        if not shown:
            continue
        if full_cells is not None:
            lines.append(["2, 3", f"the paper's configuration at the full {common.PAPER_EPOCHS} "
                          "epochs (Table 1 schedule, SE ✓, BN ✓)", *full_cells[:-1],
                          f"{CKPLUS_PAPER:.4f}", full_cells[-1]])
        epochs = common.reduced_epochs(mode)
        blocks.append(
            f"Tables 2 and 3, CK+ rows, at a reduced budget: {epochs} epochs of the paper's "
            f"{common.PAPER_EPOCHS}, Table 1's boundaries scaled to it (`python -m "
            f"experiments.paper.table2_lr --dataset ckplus --epochs {epochs} --manual_dir DIR`, and "
            "the same for `table3_ablation`). Subject-independent 10-fold cross-validation, each "
            "fold's final epoch on its test fold; everything else as the paper's CK+ settings above. "
            "The paper's figures are at 200 epochs under an unstated protocol, so compare rows "
            "with each other"
            + (", and with the last row, the paper's configuration at the full budget." if full_cells
               else ".") + "\n\n"
            + common.markdown_table(["Table", "Setting", "Accuracy (mean ± std)", "Macro F1 (mean)",
                                     "Pooled acc.", "Epochs", "Paper CK+", "Results"], lines))
    return "\n\n".join(blocks) if blocks else None


def ferplus_levers(relative_to: Path, results_root: Path = common.RESULTS) -> str | None:
    """The FER+ recipe-lever ablation at the full budget, compact: each lever's validation accuracy
    and macro F1, its gain over the paper's recipe with the seeds paired, and its cost in wall time
    (`recipe_levers`; the whole table is linked). None while no lever has been run."""
    study = recipe_levers.STUDY
    base = results_root / study.name / "full"
    _, summaries = common.row_summaries(study, "full", "ferplus", results_root)
    if not set(summaries) - {study.baseline}:
        return None
    fresh = common.fresh(summaries)
    if not fresh:
        return None
    reference = fresh.get(study.baseline)
    lines = []
    for row in study.rows:
        s = summaries.get(row.name)
        if s is None or s.stale:
            lines.append([*row.cells, common.stale_cell(s) if s else "not run yet", "", "", "", "", "",
                          ""])
            continue
        gains = (["-", "-", "-"] if reference is None
                 else common.row_gain_cells(study, row, s, summaries))
        links = " ".join(common.link(p.parent.name.replace("_", " "), p, relative_to) for p in s.paths)
        lines.append([*row.cells, common.format_mean_std(s.accuracy), common.format_mean_std(s.macro_f1),
                      *gains, f"{sum(s.wall_seconds) / len(s.wall_seconds):,.0f}" if s.wall_seconds
                      else "-", links])
    epochs = next(iter(fresh.values())).epochs
    return (f"FER+ recipe levers beyond the paper, each alone against the paper's recipe at "
            f"{epochs:g} epochs (reduced budget), scored on the validation split, which also picks each "
            "run's best epoch; the test split is never used. A gain is over the baseline run of the "
            "same seed (or over the run of the row its cells name), averaged over the seeds both "
            "have (their count in brackets); on 3,191 "
            "validation images 0.3 points is noise. The levers that pay go into "
            "configs/ferplus_plus.py. A lever's cost: wall seconds per run, on whichever CPU each run had, "
            "and its wall time against the baseline's, paired only where both ran on the same CPU "
            "(\"-\" where none did). "
            f"(`python -m experiments.paper.recipe_levers --manual_dir DIR`; "
            f"{common.link('whole table', base / 'table.md', relative_to)}.)\n\n"
            + common.markdown_table(
                [*study.row_headers, "Val. accuracy", "Macro F1", "Gain: acc. (points)",
                 "Gain: macro F1 (points)", "Wall vs baseline", "Wall s / run", "Results"], lines))


def index(relative_to: Path, tables: Path, results_root: Path = common.RESULTS) -> str:
    """The CK+ headline (`ckplus_results`), Tables 2-3's CK+ rows (`ckplus_tables_2_3`) and the FER+
    lever ablation (`ferplus_levers`), then one line per study with results (full before quick),
    linked to its table and to `tables`."""

    def row(title: str, mode: str, folder: Path | None) -> str:
        table = folder / "table.md" if folder else tables
        target = table if table.is_file() else tables
        return f"| {title} | {common.mode_label(mode)} | {common.link('table', target, relative_to)} |"

    rows = [row(study.title, mode, results_root / study.name / mode)
            for study in TRAINING_STUDIES for mode in common.modes(results_root / study.name)
            if common.study_table(study, mode, relative_to, results_root)]
    rows.append(row("Table 4: comparison with published results", "-", None))
    rows += [row("Scaling of the train step", mode, results_root / scaling.STUDY_NAME / mode)
             for mode in ("full", "quick")
             if (results_root / scaling.STUDY_NAME / mode / "scaling.json").is_file()]
    studies = "\n".join(["| study | budget | results |", "|---|---|---|", *rows,
                         "", f"Every table on one page: {common.link(tables.name, tables, relative_to)}. "
                         "Quick rows are tiny-budget runs that check each study end to end, not "
                         "evidence for or against the paper."]) + "\n"
    ckplus = [text for text in (ckplus_results(relative_to, results_root),
                                ckplus_tables_2_3(relative_to, results_root),
                                ferplus_levers(relative_to, results_root)) if text]
    return "".join(f"{text.rstrip()}\n\n" for text in ckplus) + studies


def has_section(text: str) -> bool:
    return BEGIN in text and END in text and text.index(BEGIN) < text.index(END)


def replace_section(text: str, body: str) -> str:
    """`text` with what lies between the results markers replaced by `body`; the rest untouched."""
    if not has_section(text):
        raise ValueError(f"no {BEGIN} ... {END} section")
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"expected one {BEGIN} and one {END}, found {text.count(BEGIN)} and "
                         f"{text.count(END)}")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{body.strip()}\n{END}{tail}"


def main(argv: Sequence[str] | None = None, results_root: Path = common.RESULTS) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.paper.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", help="markdown file whose results section to rewrite (an index)")
    parser.add_argument("--tables", default=str(results_root / "README.md"),
                        help="with --readme: the file that gets every table")
    args = parser.parse_args(argv)
    if args.readme:
        readme = Path(args.readme).resolve()
        text = readme.read_text() if readme.is_file() else ""
        if has_section(text):
            tables = Path(args.tables).resolve()
            tables.parent.mkdir(parents=True, exist_ok=True)
            tables.write_text("# Results of every study\n\nGenerated by `python -m experiments.paper.report "
                              "--readme README.md` from the results files below.\n\n"
                              + gather(tables.parent, results_root, heading_level=2))
            readme.write_text(replace_section(text, index(readme.parent, tables, results_root)))
            print(f"rewrote the results section of {readme} and {tables}")
            return
        print(f"{readme}: {'missing' if not readme.is_file() else 'no ' + BEGIN + ' ... ' + END}; "
              "printing the tables instead\n")
        print(gather(readme.parent, results_root))
        return
    print(gather(Path.cwd(), results_root))


if __name__ == "__main__":
    main()
