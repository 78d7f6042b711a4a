"""Gathers every study's results into markdown tables, each row linked to its results.json.

    python -m experiments.paper.report                      # print the tables
    python -m experiments.paper.report --readme README.md   # rewrite README.md's results section

Only the text between `<!-- results:begin -->` and `<!-- results:end -->` is replaced; a README
without both markers is left alone and the tables are printed instead.
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
    parser.add_argument("--readme", help="markdown file whose results section to rewrite")
    args = parser.parse_args(argv)
    if args.readme:
        readme = Path(args.readme).resolve()
        text = readme.read_text() if readme.is_file() else ""
        if has_section(text):
            readme.write_text(replace_section(text, gather(readme.parent, results_root)))
            print(f"rewrote the results section of {readme}")
            return
        print(f"{readme}: {'missing' if not readme.is_file() else 'no ' + BEGIN + ' ... ' + END}; "
              "printing the tables instead\n")
        print(gather(readme.parent, results_root))
        return
    print(gather(Path.cwd(), results_root))


if __name__ == "__main__":
    main()
