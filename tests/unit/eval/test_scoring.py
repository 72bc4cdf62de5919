"""Scorers against hand-computed values."""

from __future__ import annotations

import pytest

from llava_platform.eval.scoring import exact_match, normalize_answer, pope_scores, score_answers, yes_no


@pytest.mark.parametrize("raw, norm", [
    ("Red.", "red"), ("  The Circle ", "circle"), ("Two", "2"), ("a red, big circle!", "red big circle"),
    ("1,000", "1000"), ("2.5", "2.5"), ("top-left", "top left"), ("It's blue", "its blue"), ("none", "0"),
])
def test_vqa_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_takes_any_reference():
    assert exact_match("Three.", "3") and exact_match("square", ["rectangle", "Square"])
    assert not exact_match("red circle", "red")


def test_pope_reading_and_metrics():
    assert yes_no("No, there is not.") == "no" and yes_no("Yes. No doubt.") == "yes" and yes_no("I see it") == "yes"
    preds = ["yes", "Yes, there is.", "no", "No.", "yes", "no"]
    gold = ["yes", "yes", "yes", "no", "no", "no"]
    s = pope_scores(preds, gold)  # TP 2, FN 1, TN 2, FP 1
    assert (s.accuracy, s.precision, s.recall) == (4 / 6, 2 / 3, 2 / 3)
    assert s.f1 == pytest.approx(2 / 3) and s.yes_ratio == 0.5
    with pytest.raises(ValueError, match="yes' or 'no"):
        pope_scores(["yes"], ["maybe"])


@pytest.mark.parametrize("text, llava, tolerant", [
    # LLaVA's eval_pope.py: first sentence, commas removed, split on " ", the words No / no / not.
    ("No, there is not.", "no", "no"), ("Yes. No doubt.", "yes", "yes"), ("I see it", "yes", "yes"),
    ("Not at all", "yes", "no"), ("NO", "yes", "no"), ("Yes,no", "yes", "no"), ("Yes\nno", "yes", "no"),
    ("There is no dog", "no", "no"), ("nothing is there", "yes", "yes"), ("no.", "no", "no"),
])
def test_yes_no_reading_is_llavas_by_default_and_tolerant_on_request(text, llava, tolerant):
    assert yes_no(text) == llava and yes_no(text, "tolerant") == tolerant


def test_pope_is_scored_per_split_as_llava_reports_it():
    # eval_pope.py is run once per coco_pope_<split>.json: each split has its own F1/acc/precision/recall/yes ratio.
    key, answers = {}, []
    for split, rows in {"adversarial": [("yes", "Yes"), ("no", "Yes")], "popular": [("yes", "No"), ("no", "No")],
                        "random": [("yes", "Yes"), ("no", "No, not")]}.items():
        for k, (gold, said) in enumerate(rows):
            qid = f"{split}-{k}"
            key[qid] = {"answer": gold, "category": split}
            answers.append({"question_id": qid, "text": said})
    s = score_answers(answers, key, yes_no_categories=("adversarial", "popular", "random"))
    assert {c: (p.accuracy, p.yes_ratio) for c, p in s.pope_splits.items()} == {
        "adversarial": (0.5, 1.0), "popular": (0.5, 0.0), "random": (1.0, 0.5)}
    assert s.pope.n == 6 and s.pope.accuracy == 4 / 6
    m = s.metrics()
    assert m["pope.random.f1"] == 1.0 and m["pope.popular.recall"] == 0.0 and m["pope.accuracy"] == 4 / 6
    table = s.pope_table()
    assert "| adversarial | 2 | 0.667 | 0.500 | 0.500 | 1.000 | 1.000 |" in table and "| all | 6 |" in table


def test_score_answers_per_category_with_blind_and_missing():
    key = {"1": {"answer": "red", "category": "colour"}, "2": {"answer": "blue", "category": "colour"},
           "3": {"answer": "yes", "category": "yes_no"}, "4": {"answer": "no", "category": "yes_no"},
           "5": {"answer": "circle", "category": "shape"}}
    answers = [{"question_id": "1", "text": "Red"}, {"question_id": "2", "text": "green"},
               {"question_id": "3", "text": "Yes"}, {"question_id": "4", "text": "No."}]
    blind = [{"question_id": q, "text": "yes"} for q in "12345"]
    s = score_answers(answers, key, blind)
    by = {r.category: r for r in s.rows}
    assert (by["colour"].correct, by["yes_no"].correct, by["shape"].correct) == (1, 2, 0)
    assert (by["colour"].blind_correct, by["yes_no"].blind_correct) == (0, 1)
    assert s.unanswered == ["5"] and s.accuracy == 3 / 5 and s.blind_accuracy == 1 / 5
    assert s.pope.accuracy == 1.0 and s.blind_pope.yes_ratio == 1.0
    m = s.metrics()
    assert m["accuracy.colour"] == 0.5 and m["blind_accuracy.yes_no"] == 0.5 and m["pope.f1"] == 1.0
    assert "| all | 5 | 60.0% | 20.0% |" in s.table()
