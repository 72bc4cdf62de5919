"""Scorers for generated answers: VQA-style normalised exact match, POPE's yes/no metrics, and the
per-category table that puts a model beside its blind (image withheld) baseline."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

# The VQA evaluation's normalisation: number words to digits, articles dropped, punctuation removed
# (a period between digits is kept: 2.5), case folded.
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:|~]")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def normalize_answer(text: str) -> str:
    """``"Two red Circles."`` -> ``"2 red circles"``."""
    t = text.replace("\n", " ").replace("\t", " ").strip().lower()
    t = _THOUSANDS.sub("", t)
    t = _PERIOD.sub("", _PUNCT.sub(" ", t)).replace("'", "")
    return " ".join(_NUMBER_WORDS.get(w, w) for w in t.split() if w not in _ARTICLES)


def exact_match(prediction: str, references: str | Sequence[str]) -> bool:
    """Normalised prediction equals any normalised reference."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(r) for r in refs)


def first_answer(entry: Mapping[str, Any]) -> str:
    """An answer-key entry's answer, or its first one when it lists several."""
    answer = entry["answer"]
    return answer if isinstance(answer, str) else answer[0]


#: How a free-form answer is read as yes or no: ``llava`` exactly as LLaVA's ``eval_pope.py``;
#: ``tolerant`` also reads "Not", "NO", and words split by newlines or commas.
YesNoParsing = Literal["llava", "tolerant"]


def yes_no(text: str, parsing: YesNoParsing = "llava") -> str:
    """POPE's reading of a free-form answer: its first sentence (up to the first ``.``) says ``no``
    when it holds the word "no" or "not", else ``yes``.

    ``llava`` (LLaVA's ``eval_pope.py``): commas removed, words split on spaces, the words ``No``,
    ``no`` and ``not`` as written. ``tolerant``: commas become spaces, any whitespace splits, any case.
    """
    first = text.split(".")[0]
    if parsing == "llava":
        words = first.replace(",", "").split(" ")
        return "no" if ("No" in words or "not" in words or "no" in words) else "yes"
    words = first.replace(",", " ").lower().split()
    return "no" if ("no" in words or "not" in words) else "yes"


@dataclass
class PopeScores:
    """Yes/no metrics with "yes" as the positive class (POPE)."""

    n: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "accuracy": self.accuracy, "precision": self.precision, "recall": self.recall,
                "f1": self.f1, "yes_ratio": self.yes_ratio}


def pope_scores(predictions: Sequence[str], labels: Sequence[str], parsing: YesNoParsing = "llava") -> PopeScores:
    """POPE metrics for free-form answers against ``yes``/``no`` labels (read with ``parsing``).

    Raises:
        ValueError: lengths differ or a label is not yes/no.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    gold = [normalize_answer(label) for label in labels]
    if any(g not in ("yes", "no") for g in gold):
        raise ValueError("POPE labels must be 'yes' or 'no'")
    pred = [yes_no(p, parsing) for p in predictions]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(pred, gold))
    tn = sum(p == "no" and g == "no" for p, g in zip(pred, gold))
    fn = sum(p == "no" and g == "yes" for p, g in zip(pred, gold))
    n = len(gold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PopeScores(n, (tp + tn) / n if n else 0.0, precision, recall, f1, (tp + fp) / n if n else 0.0)


@dataclass
class CategoryRow:
    category: str
    n: int
    correct: int
    blind_correct: int | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def blind_accuracy(self) -> float | None:
        return None if self.blind_correct is None else (self.blind_correct / self.n if self.n else 0.0)


@dataclass
class Scores:
    """Everything the scorers computed for one evaluation."""

    rows: list[CategoryRow]
    pope: PopeScores | None = None
    blind_pope: PopeScores | None = None
    unanswered: list[str] = field(default_factory=list)
    # POPE per yes/no category (LLaVA reports adversarial, popular and random apart).
    pope_splits: dict[str, PopeScores] = field(default_factory=dict)
    blind_pope_splits: dict[str, PopeScores] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return sum(r.n for r in self.rows)

    @property
    def accuracy(self) -> float:
        return sum(r.correct for r in self.rows) / self.n if self.n else 0.0

    @property
    def blind_accuracy(self) -> float | None:
        if any(r.blind_correct is None for r in self.rows):
            return None
        return sum(r.blind_correct or 0 for r in self.rows) / self.n if self.n else 0.0

    def metrics(self) -> dict[str, float]:
        """Flat metric names for MLflow: ``accuracy``, ``accuracy.<category>``, ``blind_accuracy...``,
        ``pope.<metric>`` (over every yes/no category) and ``pope.<category>.<metric>``."""
        out: dict[str, float] = {"accuracy": self.accuracy, "questions": float(self.n)}
        for r in self.rows:
            out[f"accuracy.{r.category}"] = r.accuracy
            if r.blind_accuracy is not None:
                out[f"blind_accuracy.{r.category}"] = r.blind_accuracy
        if self.blind_accuracy is not None:
            out["blind_accuracy"] = self.blind_accuracy
        for prefix, pope, splits in (("pope", self.pope, self.pope_splits),
                                     ("blind_pope", self.blind_pope, self.blind_pope_splits)):
            if pope is not None:
                out.update({f"{prefix}.{k}": float(v) for k, v in pope.as_dict().items() if k != "n"})
            for cat, scores in splits.items():
                out.update({f"{prefix}.{cat}.{k}": float(v) for k, v in scores.as_dict().items() if k != "n"})
        return out

    def pope_table(self) -> str:
        """POPE per yes/no category as LLaVA's ``eval_pope.py`` prints it (F1, accuracy, precision,
        recall, yes ratio), in Markdown; empty when there is no yes/no category."""
        if self.pope is None:
            return ""
        lines = ["| category | questions | F1 | accuracy | precision | recall | yes ratio |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for cat, p in list(self.pope_splits.items()) + [("all", self.pope)]:
            lines.append(f"| {cat} | {p.n} | {p.f1:.3f} | {p.accuracy:.3f} | {p.precision:.3f} | {p.recall:.3f} "
                         f"| {p.yes_ratio:.3f} |")
        return "\n".join(lines)

    def table(self) -> str:
        """The per-category table in Markdown."""
        lines = ["| category | questions | model accuracy | blind accuracy |", "| --- | ---: | ---: | ---: |"]
        for r in self.rows + [CategoryRow("all", self.n, sum(x.correct for x in self.rows),
                                          None if self.blind_accuracy is None
                                          else sum(x.blind_correct or 0 for x in self.rows))]:
            blind = "-" if r.blind_accuracy is None else f"{r.blind_accuracy:.1%}"
            lines.append(f"| {r.category} | {r.n} | {r.accuracy:.1%} | {blind} |")
        return "\n".join(lines)


def score_answers(answers: Iterable[Mapping[str, Any]], key: Mapping[str, Mapping[str, Any]],
                  blind: Iterable[Mapping[str, Any]] | None = None,
                  yes_no_categories: Sequence[str] = ("yes_no",), parsing: YesNoParsing = "llava") -> Scores:
    """Score LLaVA-format answers (``question_id``, ``text``) against an answer key
    (``question_id -> {"answer": str | list, "category": str}``), per category, with the blind
    baseline's answers beside them when given. Questions in the key without an answer count as wrong
    and are listed in ``unanswered``. Categories in ``yes_no_categories`` are also scored as POPE,
    each alone and all together.
    """
    predicted = {str(a["question_id"]): a["text"] for a in answers}
    blind_pred = None if blind is None else {str(a["question_id"]): a["text"] for a in blind}
    rows: dict[str, CategoryRow] = {}
    yn: dict[str, tuple[list[str], list[str], list[str]]] = {}  # category -> (predicted, blind, gold)
    unanswered = []
    for qid, entry in key.items():
        cat = str(entry.get("category", "all"))
        row = rows.setdefault(cat, CategoryRow(cat, 0, 0, None if blind_pred is None else 0))
        row.n += 1
        if qid not in predicted:
            unanswered.append(qid)
        row.correct += exact_match(predicted.get(qid, ""), entry["answer"])
        if blind_pred is not None:
            row.blind_correct = (row.blind_correct or 0) + exact_match(blind_pred.get(qid, ""), entry["answer"])
        if cat in yes_no_categories:
            pred, blind_yn, gold = yn.setdefault(cat, ([], [], []))
            gold.append(first_answer(entry))
            pred.append(predicted.get(qid, ""))
            if blind_pred is not None:
                blind_yn.append(blind_pred.get(qid, ""))
    scores = Scores(sorted(rows.values(), key=lambda r: r.category), unanswered=unanswered)
    if yn:
        cats = sorted(yn)
        scores.pope_splits = {c: pope_scores(yn[c][0], yn[c][2], parsing) for c in cats}
        scores.pope = pope_scores([p for c in cats for p in yn[c][0]], [g for c in cats for g in yn[c][2]], parsing)
        if blind_pred is not None:
            scores.blind_pope_splits = {c: pope_scores(yn[c][1], yn[c][2], parsing) for c in cats}
            scores.blind_pope = pope_scores([p for c in cats for p in yn[c][1]], [g for c in cats for g in yn[c][2]],
                                            parsing)
    return scores
