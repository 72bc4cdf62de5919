"""LLM-judge review in LLaVA-Bench's manner: a judge model sees the question, a reference answer
and the evaluated model's answer, scores both from 1 to 10, and the model's relative score is its
mean over the reference's mean (x100). Any OpenAI-compatible endpoint can judge: GPT-4 in the cloud,
or a model on our own Serve endpoint.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

JUDGE_SYSTEM = "You review answers to questions about images carefully and impartially."

_REVIEW = """[Question]
{question}

[Assistant 1]
{reference}
[End of Assistant 1]

[Assistant 2]
{answer}
[End of Assistant 2]

[Instructions]
Two assistants answered the question above about an image you cannot see; Assistant 1's answer is
known to describe the image correctly. Judge how helpful, relevant, accurate and detailed each answer
is, and give each an overall score from 1 to 10, higher being better.
On the first line write only the two scores, Assistant 1's then Assistant 2's, separated by a space.
From the second line on, explain your judgement briefly, without letting the order in which the
answers appear or their length sway you."""

_SCORES = re.compile(r"^\s*\(?\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*[,\s]\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\)?\s*$")


def review_prompt(question: str, reference: str, answer: str) -> str:
    return _REVIEW.format(question=question.strip(), reference=reference.strip(), answer=answer.strip())


def parse_scores(review: str) -> tuple[float, float] | None:
    """The two scores on the review's first non-empty line (``8 6``, ``8, 6``, ``8/10 6/10``), or
    None when the judge did not follow the format or a score is outside 1-10."""
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
    question_id: str
    category: str
    reference_score: float | None
    model_score: float | None
    review: str


@dataclass
class JudgeSummary:
    reviews: list[Review]

    @property
    def parsed(self) -> list[Review]:
        return [r for r in self.reviews if r.model_score is not None]

    def relative_score(self, category: str | None = None) -> float | None:
        """100 x mean(model score) / mean(reference score) over the parsed reviews."""
        rs = [r for r in self.parsed if category is None or r.category == category]
        ref = sum(r.reference_score or 0 for r in rs)
        return 100.0 * sum(r.model_score or 0 for r in rs) / ref if rs and ref else None

    def metrics(self) -> dict[str, float]:
        out = {"judge.reviews": float(len(self.reviews)), "judge.unparsed": float(len(self.reviews) - len(self.parsed))}
        overall = self.relative_score()
        if overall is not None:
            out["judge.relative_score"] = overall
            out["judge.model_score"] = sum(r.model_score or 0 for r in self.parsed) / len(self.parsed)
            out["judge.reference_score"] = sum(r.reference_score or 0 for r in self.parsed) / len(self.parsed)
        for cat in sorted({r.category for r in self.parsed}):
            score = self.relative_score(cat)
            if score is not None:
                out[f"judge.relative_score.{cat}"] = score
        return out


def review_answers(items: Sequence[Mapping[str, Any]], base_url: str, model: str, api_key: str | None = None,
                   concurrency: int = 4, max_tokens: int = 256) -> JudgeSummary:
    """Ask the judge about each ``{question_id, category, question, reference, answer}`` item
    (greedy, so a review can be reproduced). A request that fails counts as unparsed, with the error
    as its review text, so one bad call does not lose the others.
    """
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=2, timeout=120)

    def one(item: Mapping[str, Any]) -> Review:
        try:
            res = client.chat.completions.create(
                model=model, temperature=0, max_tokens=max_tokens,
                messages=[{"role": "system", "content": JUDGE_SYSTEM},
                          {"role": "user", "content": review_prompt(item["question"], item["reference"], item["answer"])}])
            text = res.choices[0].message.content or ""
        except openai.OpenAIError as e:
            text = f"judge request failed: {type(e).__name__}: {e}"
        scores = parse_scores(text)
        return Review(str(item["question_id"]), str(item.get("category", "all")),
                      scores[0] if scores else None, scores[1] if scores else None, text)

    with ThreadPoolExecutor(concurrency) as pool:
        return JudgeSummary(list(pool.map(one, items)))
