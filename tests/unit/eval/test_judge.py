"""The LLM-judge review: score parsing, the relative score, and a real OpenAI-compatible endpoint."""

from __future__ import annotations

import pytest

from llava_platform.eval.judge import JudgeSummary, Review, parse_scores, review_answers, review_prompt


@pytest.mark.parametrize("text, scores", [
    ("8 6\nAssistant 2 missed the colour.", (8.0, 6.0)), ("\n 9, 7.5 \nwhy", (9.0, 7.5)),
    ("8/10 4/10\n", (8.0, 4.0)), ("Assistant 1: 8\nAssistant 2: 6", None), ("11 3", None), ("", None),
])
def test_parse_scores(text, scores):
    assert parse_scores(text) == scores


def test_prompt_holds_question_reference_and_answer():
    p = review_prompt("What colour?", "The circle is red.", "red")
    assert "What colour?" in p and "The circle is red." in p and p.index("Assistant 1") < p.index("Assistant 2")


def test_relative_score_is_model_over_reference():
    s = JudgeSummary([Review("1", "colour", 8, 6, ""), Review("2", "shape", 10, 10, ""), Review("3", "shape", None, None, "?")])
    assert s.relative_score() == pytest.approx(100 * 16 / 18)
    assert s.relative_score("shape") == 100.0
    m = s.metrics()
    assert m["judge.unparsed"] == 1 and m["judge.reviews"] == 3 and m["judge.relative_score.colour"] == 75.0


def test_unreachable_judge_counts_as_unparsed_and_loses_nothing():
    items = [{"question_id": str(i), "category": "c", "question": "q", "reference": "r", "answer": "a"} for i in range(3)]
    s = review_answers(items, "http://127.0.0.1:9/v1", "judge")
    assert len(s.reviews) == 3 and not s.parsed and all("failed" in r.review for r in s.reviews)


@pytest.mark.ray
def test_our_serve_endpoint_can_be_the_judge(serve_app):
    """The tiny random model cannot follow the format; the point is the real round trip."""
    items = [{"question_id": "1", "category": "colour", "question": "What colour?", "reference": "red", "answer": "red"}]
    s = review_answers(items, f"{serve_app.url}/v1", "llava", max_tokens=8)
    assert len(s.reviews) == 1 and "failed" not in s.reviews[0].review
    assert s.reviews[0].review  # the served model's text, kept for inspection
