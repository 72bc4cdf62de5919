"""The LLM-judge review: score parsing, the relative score, and a real OpenAI-compatible endpoint."""

from __future__ import annotations

import pytest

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from llava_platform.eval.judge import (JudgeSummary, Review, context_text, parse_scores, read_rules, review_answers,
                                       review_prompt, rule_for)


@pytest.mark.parametrize("text, scores", [
    ("8 6\nAssistant 2 missed the colour.", (8.0, 6.0)), ("\n 9, 7.5 \nwhy", (9.0, 7.5)),
    ("8/10 4/10\n", (8.0, 4.0)), ("Assistant 1: 8\nAssistant 2: 6", None), ("11 3", None), ("", None),
])
def test_parse_scores(text, scores):
    assert parse_scores(text) == scores


def test_prompt_is_laid_out_as_llavas_review():
    # eval_gpt_review_bench.py: [Context], [Question], [Assistant 1] ... [End of Assistant 1], the same
    # for 2, then [System] with the rule's prompt.
    p = review_prompt("What colour?", "The circle is red.", "red", "A red circle.\ncircle: [0.1, 0.2, 0.5, 0.6]", "RULE")
    assert p == ("[Context]\nA red circle.\ncircle: [0.1, 0.2, 0.5, 0.6]\n\n[Question]\nWhat colour?\n\n"
                 "[Assistant 1]\nThe circle is red.\n\n[End of Assistant 1]\n\n"
                 "[Assistant 2]\nred\n\n[End of Assistant 2]\n\n[System]\nRULE\n\n")


def test_context_and_rules_from_llavas_files():
    assert context_text({"image": "001.jpg", "caption": "A cat.\nOn a mat."}) == "A cat.\nOn a mat."
    coco = {"image": "x.jpg", "captions": ["A dog.", "A brown dog."],
            "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.3, 0.4]}]}
    assert context_text(coco) == "A dog.\nA brown dog.\n\ndog: [0.1, 0.2, 0.3, 0.4]"
    rules = read_rules(json.dumps({"llava_bench_conv": {"role": "Assistant", "prompt": "conv rule"},
                                   "default": {"role": "Helper", "prompt": "other"}}).encode())
    assert rule_for(rules, "conv") == ("Assistant", "conv rule") and rule_for(rules, "detail") == ("Helper", "other")
    assert rule_for(None, "conv")[0] == "Assistant" and rule_for({"llava_bench_conv": rules["llava_bench_conv"]}, "x") is None
    with pytest.raises(ValueError, match="rule.json"):
        read_rules(b'{"x": 1}')


def test_review_rows_and_summary_are_llavas():
    # summarize_gpt_review.py: per category mean of `tuple`, printed as relative score, then x10 each.
    s = JudgeSummary([Review(1, "conv", 8, 6, "8 6\nok", 1, "a1"), Review(2, "detail", 10, 9, "10 9", 2, "a2"),
                      Review(3, "conv", None, None, "bad", 3, "a3")])
    rows = s.llava_rows()
    assert rows[0] == {"id": 1, "question_id": 1, "answer1_id": 1, "answer2_id": "a1", "category": "conv",
                       "content": "8 6\nok", "tuple": [8, 6]}
    assert rows[2]["tuple"] == [-1, -1]
    table = s.table()
    assert "| all | 2 | 83.3 | 90.0 | 75.0 |" in table and "| conv | 1 | 75.0 | 80.0 | 60.0 |" in table


def test_relative_score_is_model_over_reference():
    s = JudgeSummary([Review("1", "colour", 8, 6, ""), Review("2", "shape", 10, 10, ""), Review("3", "shape", None, None, "?")])
    assert s.relative_score() == pytest.approx(100 * 16 / 18)
    assert s.relative_score("shape") == 100.0
    m = s.metrics()
    assert m["judge.unparsed"] == 1 and m["judge.reviews"] == 3 and m["judge.relative_score.colour"] == 75.0


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint on loopback that records what it is sent (the cloud judge is out of reach)."""

    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        _Judge.seen.append(body)
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": "8 6\nAssistant 2 is less detailed."}}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_the_judge_gets_llavas_request_context_rule_and_temperature():
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        items = [{"question_id": 7, "category": "conv", "question": "What is it?", "image": "001.jpg",
                  "reference": "A cat.", "answer": "A dog.", "answer2_id": "ans-7"}]
        s = review_answers(items, f"http://127.0.0.1:{server.server_port}/v1", "gpt-4o",
                           contexts={"001.jpg": {"caption": "A cat on a mat."}},
                           rules={"llava_bench_conv": {"role": "Assistant", "prompt": "THE RULE"}})
    finally:
        server.shutdown()
    body = _Judge.seen[-1]
    assert body["temperature"] == 0.2 and body["model"] == "gpt-4o" and body["max_tokens"] == 1024
    prompt = body["messages"][1]["content"]
    assert prompt.startswith("[Context]\nA cat on a mat.\n\n[Question]\nWhat is it?") and prompt.endswith("[System]\nTHE RULE\n\n")
    assert s.llava_rows() == [{"id": 1, "question_id": 7, "answer1_id": 7, "answer2_id": "ans-7", "category": "conv",
                               "content": "8 6\nAssistant 2 is less detailed.", "tuple": [8.0, 6.0]}]


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
