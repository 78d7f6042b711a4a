"""FER+ label modes: from ten crowd vote counts to a training target.

Barsoum et al., "Training Deep Networks for Facial Expression Recognition with Crowd-Sourced Label
Distribution" (arXiv 1608.01041), Section 3, and the reference reader `src/ferplus.py` of
github.com/microsoft/FERPlus. Every image has 10 votes from 10 taggers over
`VOTE_NAMES` = 8 emotions + unknown + NF (not a face). The rules below follow the reference reader:

* Outliers: every count of 1 is set to 0 first (a single tagger disagreeing), in every mode.
* `majority`: the top count must exceed half of the remaining votes and belong to an emotion;
  the target is one-hot.
* `crossentropy` / `probability`: take the top counts, ties included, until they cover at least
  75% of the votes or 3 have been taken; unknown / NF end the search (and are not part of the
  distribution when an emotion was taken before them). The image is kept when the taken counts
  cover more than half of the votes, at most 3 categories were taken and the first one is an
  emotion. The target is the taken counts normalised to sum 1. `probability` has the same targets;
  the input pipeline draws a one-hot label from them each time the example is drawn.
* `multi_target`: every category with at least 30% of the votes; kept when these cover more than
  half of the votes and the largest of them is an emotion. The reference counts unknown / NF
  towards the half (then removes them from the target); we do the same. The reference target is
  1 for each kept emotion plus a small epsilon everywhere; we use the same emotions with equal
  weight 1/m, so the target is a distribution (the epsilon only served its loss's conditioning).

A dropped image is counted under the first rule it fails, in the reference's order:
`no_votes` (nothing left after removing single votes), then the mode's coverage rule(s)
(`no_majority`, `low_coverage`, `too_many_ties`), then `top_not_emotion`.
"""

from __future__ import annotations

import numpy as np

EMOTIONS = (
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
)
VOTE_NAMES = EMOTIONS + ("unknown", "NF")
# CK+'s seven sequence labels, in the order of the official emotion codes 1-7 (`ckplus`).
CKPLUS_EMOTIONS = ("anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise")
NUM_EMOTIONS = len(EMOTIONS)
LABEL_MODES = ("majority", "crossentropy", "probability", "multi_target")

# Drop rules each mode can apply, in the order they are checked.
DROP_RULES = {
    "majority": ("no_votes", "no_majority", "top_not_emotion"),
    "crossentropy": ("no_votes", "low_coverage", "too_many_ties", "top_not_emotion"),
    "probability": ("no_votes", "low_coverage", "too_many_ties", "top_not_emotion"),
    "multi_target": ("no_votes", "low_coverage", "top_not_emotion"),
}
ALL_DROP_RULES = ("no_votes", "no_majority", "low_coverage", "too_many_ties", "top_not_emotion")

_MAX_TOP = 3  # categories taken by crossentropy / probability
_TOP_COVERAGE = 0.75  # ... until they cover this share of the votes
_MULTI_THRESHOLD = 0.3  # multi_target: share of the votes that makes a category a target
_KEEP_COVERAGE = 0.5  # every mode: kept votes must exceed this share


def _majority(votes: np.ndarray, total: float) -> tuple[np.ndarray | None, str | None]:
    top = int(np.argmax(votes))
    if votes[top] <= _KEEP_COVERAGE * total:
        return None, "no_majority"
    if top >= NUM_EMOTIONS:
        return None, "top_not_emotion"
    target = np.zeros(NUM_EMOTIONS, np.float32)
    target[top] = 1.0
    return target, None


def _top_distribution(votes: np.ndarray, total: float) -> tuple[np.ndarray | None, str | None]:
    remaining = votes.copy()
    taken = np.zeros_like(votes)
    covered, count, stopped = 0.0, 0, False
    while covered < _TOP_COVERAGE * total and count < _MAX_TOP and not stopped:
        peak = remaining.max()
        for i in np.flatnonzero(remaining == peak):  # ties are all taken, in category order
            taken[i], remaining[i] = peak, 0.0
            covered += peak
            count += 1
            if i >= NUM_EMOTIONS:  # unknown / NF ends the search
                stopped = True
                if taken.sum() > peak:  # an emotion came first: leave unknown / NF out
                    taken[i] = 0.0
                    count -= 1
                break
    if taken.sum() <= _KEEP_COVERAGE * total:
        return None, "low_coverage"
    if count > _MAX_TOP:
        return None, "too_many_ties"
    if int(np.argmax(taken)) >= NUM_EMOTIONS:
        return None, "top_not_emotion"
    emotions = taken[:NUM_EMOTIONS]
    return (emotions / emotions.sum()).astype(np.float32), None


def _multi_target(votes: np.ndarray, total: float) -> tuple[np.ndarray | None, str | None]:
    taken = np.where(votes >= _MULTI_THRESHOLD * total, votes, 0.0)
    if taken.sum() <= _KEEP_COVERAGE * total:
        return None, "low_coverage"
    if int(np.argmax(taken)) >= NUM_EMOTIONS:
        return None, "top_not_emotion"
    chosen = (taken[:NUM_EMOTIONS] > 0).astype(np.float32)
    return chosen / chosen.sum(), None


_RULES = {
    "majority": _majority,
    "crossentropy": _top_distribution,
    "probability": _top_distribution,
    "multi_target": _multi_target,
}


def check_mode(mode: str) -> None:
    if mode not in _RULES:
        raise ValueError(f"unknown FER+ label mode {mode!r}; expected one of {LABEL_MODES}")


def target_from_votes(votes, mode: str) -> tuple[np.ndarray | None, str | None]:
    """Target [8] float32 for one image's 10 vote counts, or (None, rule) when the mode drops it."""
    check_mode(mode)
    votes = np.asarray(votes, dtype=np.float64)
    if votes.shape != (len(VOTE_NAMES),):
        raise ValueError(f"expected {len(VOTE_NAMES)} vote counts, got shape {votes.shape}")
    votes = np.where(votes <= 1, 0.0, votes)  # outlier removal: single votes do not count
    total = float(votes.sum())
    if total <= 0:
        return None, "no_votes"
    return _RULES[mode](votes, total)


def apply_label_mode(votes: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Applies `mode` to vote counts [N, 10].

    Returns (keep [N] bool, targets [kept, 8] float32, counts), where counts is
    {"total", "kept", "dropped_<rule>" for every rule of the mode}; total == kept + sum(dropped).
    """
    check_mode(mode)
    votes = np.asarray(votes)
    keep = np.zeros(len(votes), bool)
    targets = []
    counts = {"total": len(votes), "kept": 0}
    counts.update({f"dropped_{rule}": 0 for rule in DROP_RULES[mode]})
    for i, row in enumerate(votes):
        target, rule = target_from_votes(row, mode)
        if target is None:
            counts[f"dropped_{rule}"] += 1
        else:
            keep[i] = True
            targets.append(target)
    counts["kept"] = int(keep.sum())
    targets = np.stack(targets) if targets else np.zeros((0, NUM_EMOTIONS), np.float32)
    return keep, targets, counts
