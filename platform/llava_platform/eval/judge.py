"""LLM-judge review in the manner of LLaVA-Bench (``llava/eval/eval_gpt_review_bench.py`` and
``summarize_gpt_review.py``): a judge model sees the image's context (its captions, and object boxes
where the context file has them), the question, a reference answer ("Assistant 1") and the evaluated
model's answer ("Assistant 2") and a rule, scores both from 1 to 10 on its first line, and the
model's relative score is its mean over the reference's mean (x100). Any OpenAI-compatible endpoint
can judge: GPT-4 in the cloud, or a model on our own Serve endpoint.

LLaVA's own rule file (``llava/eval/table/rule.json``) can be given as is (``judge.rules``); without
it the rule below is used. Reviews are written in LLaVA's review-file form, so its summary script
reads them.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

JUDGE_SYSTEM = "You are a careful and precise reviewer of answers to questions about images."
JUDGE_TEMPERATURE = 0.2  # LLaVA's eval_gpt_review_bench.py
ROLE = "Assistant"

# Used when no LLaVA rule file is given; the same instructions as LLaVA-Bench's, in our words.
DEFAULT_RULE = (
    "Please review the two AI assistants' answers to the user's question above. The user asked it while "
    "looking at an image, which you cannot see: the context above describes its content in a few sentences "
    "(and, where given, the objects in it with their bounding boxes).\n"
    "Rate each answer for helpfulness, relevance, accuracy and level of detail, with one overall score from "
    "1 to 10 per assistant; higher is better.\n"
    "Write a first line holding only the two scores, Assistant 1's then Assistant 2's, separated by a space.\n"
    "From the next line on, explain your ratings in full. Avoid any bias, and do not let the order in which "
    "the answers were shown, or their length, affect your judgement."
)


def review_prompt(question: str, reference: str, answer: str, context: str = "", rule: str = DEFAULT_RULE,
                  role: str = ROLE) -> str:
    """The judge's message, laid out as LLaVA's: context, question, the two answers, the rule."""
    return (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
            f"[{role} 1]\n{reference}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n[System]\n{rule}\n\n")


def context_text(entry: Mapping[str, Any] | None) -> str:
    """An image's context from a LLaVA context file row: its captions (``caption`` in LLaVA-Bench's
    ``context.jsonl``, ``captions`` in COCO's), then, after a blank line, ``category: bbox`` per
    instance where present (as ``eval_gpt_review_visual.py`` lays them out)."""
    if not entry:
        return ""
    captions = entry.get("caption", entry.get("captions", []))
    text = captions if isinstance(captions, str) else "\n".join(str(c) for c in captions)
    boxes = [f"{i['category']}: {i['bbox']}" for i in entry.get("instances", []) if "category" in i and "bbox" in i]
    return text + ("\n\n" + "\n".join(boxes) if boxes else "")


def rule_for(rules: Mapping[str, Any] | None, category: str) -> tuple[str, str] | None:
    """``(role, prompt)`` for a question category from LLaVA's rule file (key ``llava_bench_<category>``,
    then ``<category>``, then ``default``); None when a rule file has none of them; our default
    rule when there is no rule file."""
    if not rules:
        return ROLE, DEFAULT_RULE
    for key in (f"llava_bench_{category}", category, "default"):
        if key in rules:
            return str(rules[key].get("role", ROLE)), str(rules[key]["prompt"])
    return None


_SCORES = re.compile(r"^\s*\(?\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*[,\s]\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\)?\s*$")


def parse_scores(review: str) -> tuple[float, float] | None:
    """The two scores on the review's first non-empty line: everything LLaVA's parser reads (``8 6``,
    ``8,6``) and a little more (``8, 6``, ``8/10 6/10``); None when the judge did not follow the
    format or a score is outside 0-10 (LLaVA then records ``[-1, -1]``)."""
    for line in review.splitlines():
        if line.strip():
            m = _SCORES.match(line)
            if not m:
                return None
            a, b = float(m.group(1)), float(m.group(2))
            return (a, b) if 0 <= a <= 10 and 0 <= b <= 10 else None
    return None


@dataclass
class Review:
    question_id: Any
    category: str
    reference_score: float | None
    model_score: float | None
    review: str
    answer1_id: Any = None
    answer2_id: Any = None

    def llava_row(self, n: int) -> dict[str, Any]:
        """This review as a row of LLaVA's review file (``id``, ``question_id``, ``answer1_id``,
        ``answer2_id``, ``category``, ``content``, ``tuple``: the two scores, ``[-1, -1]`` unparsed)."""
        scores = [self.reference_score, self.model_score] if self.model_score is not None else [-1, -1]
        return {"id": n, "question_id": self.question_id, "answer1_id": self.answer1_id,
                "answer2_id": self.answer2_id, "category": self.category, "content": self.review, "tuple": scores}


@dataclass
class JudgeSummary:
    reviews: list[Review] = field(default_factory=list)

    @property
    def parsed(self) -> list[Review]:
        return [r for r in self.reviews if r.model_score is not None]

    def _means(self, category: str | None) -> tuple[float, float] | None:
        rs = [r for r in self.parsed if category is None or r.category == category]
        if not rs:
            return None
        return (sum(r.reference_score or 0 for r in rs) / len(rs), sum(r.model_score or 0 for r in rs) / len(rs))

    def relative_score(self, category: str | None = None) -> float | None:
        """100 x mean(model score) / mean(reference score) over the parsed reviews."""
        means = self._means(category)
        return 100.0 * means[1] / means[0] if means and means[0] else None

    def metrics(self) -> dict[str, float]:
        out = {"judge.reviews": float(len(self.reviews)), "judge.unparsed": float(len(self.reviews) - len(self.parsed))}
        means = self._means(None)
        overall = self.relative_score()
        if means is not None and overall is not None:
            out["judge.relative_score"] = overall
            out["judge.reference_score"], out["judge.model_score"] = means
        for cat in sorted({r.category for r in self.parsed}):
            score = self.relative_score(cat)
            if score is not None:
                out[f"judge.relative_score.{cat}"] = score
        return out

    def table(self) -> str:
        """Per category and ``all``, as LLaVA's ``summarize_gpt_review.py`` prints them: the relative
        score, then the reference's and the model's mean scores x10 (one decimal). Over parsed reviews
        only: LLaVA's script would average the ``[-1, -1]`` of unparsed ones in (their count is in
        the metrics, ``judge.unparsed``)."""
        lines = ["| category | reviews | relative score | reference x10 | model x10 |", "| --- | ---: | ---: | ---: | ---: |"]
        for cat in ["all", *sorted({r.category for r in self.parsed})]:
            means = self._means(None if cat == "all" else cat)
            if means is None:
                continue
            n = len([r for r in self.parsed if cat == "all" or r.category == cat])
            rel = f"{100 * means[1] / means[0]:.1f}" if means[0] else "-"
            lines.append(f"| {cat} | {n} | {rel} | {means[0] * 10:.1f} | {means[1] * 10:.1f} |")
        return "\n".join(lines)

    def llava_rows(self) -> list[dict[str, Any]]:
        return [r.llava_row(n) for n, r in enumerate(self.reviews, 1)]


def review_answers(items: Sequence[Mapping[str, Any]], base_url: str, model: str, api_key: str | None = None,
                   concurrency: int = 4, max_tokens: int = 1024, temperature: float = JUDGE_TEMPERATURE,
                   contexts: Mapping[str, Mapping[str, Any]] | None = None,
                   rules: Mapping[str, Any] | None = None) -> JudgeSummary:
    """Ask the judge about each ``{question_id, category, question, reference, answer}`` item (with
    ``image`` to find its context in ``contexts``, keyed by image; ``answer1_id``/``answer2_id`` for
    the review rows). A request that fails counts as unparsed, with the error as its review text, so
    one bad call does not lose the others.
    """
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=2, timeout=120)

    def one(item: Mapping[str, Any]) -> Review:
        category = str(item.get("category", "all"))
        role, rule = rule_for(rules, category) or (ROLE, DEFAULT_RULE)
        context = context_text((contexts or {}).get(str(item.get("image", ""))))
        prompt = review_prompt(str(item["question"]).strip(), str(item["reference"]).strip(),
                               str(item["answer"]).strip(), context, rule, role)
        try:
            res = client.chat.completions.create(
                model=model, temperature=temperature, max_tokens=max_tokens,
                messages=[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}])
            text = res.choices[0].message.content or ""
        except openai.OpenAIError as e:
            text = f"judge request failed: {type(e).__name__}: {e}"
        scores = parse_scores(text)
        return Review(item["question_id"], category, scores[0] if scores else None, scores[1] if scores else None,
                      text, item.get("answer1_id", item["question_id"]), item.get("answer2_id"))

    with ThreadPoolExecutor(concurrency) as pool:
        return JudgeSummary(list(pool.map(one, items)))


def read_rules(raw: bytes) -> dict[str, Any]:
    """LLaVA's ``rule.json``: ``{name: {"role": ..., "prompt": ...}}``.

    Raises:
        ValueError: not a JSON object of objects with a ``prompt``.
    """
    rules = json.loads(raw)
    if not isinstance(rules, dict) or not all(isinstance(v, dict) and "prompt" in v for v in rules.values()):
        raise ValueError("a rule file is a JSON object of {\"role\", \"prompt\"} objects (LLaVA's rule.json)")
    return rules
