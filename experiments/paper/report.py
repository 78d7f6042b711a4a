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
    scaling,
    table2_lr,
    table3_ablation,
    table4_compare,
)

BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
TRAINING_STUDIES = (table2_lr.STUDY, table3_ablation.STUDY, loss_study.STUDY, label_modes.STUDY,
                    ckplus_protocols.STUDY)


def gather(relative_to: Path, results_root: Path = common.RESULTS, heading_level: int = 3,
           table4_sources: Sequence[str] = table4_compare.DEFAULT_SOURCES) -> str:
    """Every table with results (full before quick), links relative to `relative_to`."""
    parts = []
    for study in TRAINING_STUDIES:
        for mode in ("full", "quick"):
            text = common.study_table(study, mode, relative_to, results_root, heading_level)
            if text:
                parts.append(text)
    parts.append(table4_compare.markdown(relative_to, table4_sources, heading_level))
    for mode in ("full", "quick"):
        text = scaling.markdown(mode, relative_to, heading_level, results_root)
        if text:
            parts.append(text)
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def index(relative_to: Path, tables: Path, results_root: Path = common.RESULTS) -> str:
    """One line per study with results (full before quick), linked to its table and to `tables`."""
    rows = []
    for study in TRAINING_STUDIES:
        for mode in ("full", "quick"):
            if common.study_table(study, mode, relative_to, results_root):
                table = results_root / study.name / mode / "table.md"
                target = table if table.is_file() else tables
                rows.append(f"| {study.title} | {mode} | {common.link('table', target, relative_to)} |")
    rows.append(f"| Table 4: comparison with published results | - | "
                f"{common.link('table', tables, relative_to)} |")
    for mode in ("full", "quick"):
        if (results_root / scaling.STUDY_NAME / mode / "scaling.json").is_file():
            table = results_root / scaling.STUDY_NAME / mode / "table.md"
            target = table if table.is_file() else tables
            link = common.link("table", target, relative_to)
            rows.append(f"| Scaling of the train step | {mode} | {link} |")
    return "\n".join(["| study | budget | results |", "|---|---|---|", *rows,
                      "", f"Every table on one page: {common.link(tables.name, tables, relative_to)}. "
                      "Quick rows are tiny-budget runs that check each study end to end, not "
                      "evidence for or against the paper."]) + "\n"


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
