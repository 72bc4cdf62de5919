"""The evaluation job: questions -> answers (Ray Data) -> scores, blind baseline, optional LLM judge ->
files in ``output_dir`` and an MLflow run nested under the evaluated model's training run.

    python jobs/evaluate.py --config jobs/configs/eval_smoke.yaml
    llava-platform eval --model demo_run/models/finetune --questions data/eval/questions.jsonl ...
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from llava_platform import storage
from llava_platform.config.schema import EvalJobConfig, JudgeConfig, ModelSpec, StorageConfig
from llava_platform.eval.generate import EvalError, generate_answers, read_jsonl, read_questions
from llava_platform.eval.judge import JudgeSummary, read_rules, review_answers, rule_for
from llava_platform.eval.scoring import Scores, first_answer, score_answers

ANSWER_FIELDS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")


@dataclass
class EvalResult:
    scores: Scores | None
    judge: JudgeSummary | None
    output_dir: str
    answers: int
    errors: int
    mlflow_run_id: str | None
    seconds: float

    def summary(self) -> str:
        lines = [f"[eval] {self.answers} answers in {self.seconds:.0f}s ({self.errors} with errors) -> {self.output_dir}"]
        if self.scores is not None:
            lines.append(self.scores.table())
            if self.scores.pope is not None:
                p = self.scores.pope
                lines.append(f"yes/no (POPE): accuracy {p.accuracy:.1%}, precision {p.precision:.1%}, "
                             f"recall {p.recall:.1%}, F1 {p.f1:.1%}, yes-ratio {p.yes_ratio:.1%}")
        if self.judge is not None:
            m = self.judge.metrics()
            lines.append(f"judge: relative score {m.get('judge.relative_score', float('nan')):.1f} "
                         f"({int(m['judge.unparsed'])} of {int(m['judge.reviews'])} reviews unparsed)")
        if self.mlflow_run_id:
            lines.append(f"MLflow run: {self.mlflow_run_id}")
        return "\n".join(lines)


def model_id_of(spec: ModelSpec) -> str:
    if spec.checkpoint is None:
        return f"preset-{spec.preset}" if spec.preset else "composed"
    return spec.checkpoint.rstrip("/").split("/")[-1] if not spec.checkpoint.startswith("models:/") \
        else spec.checkpoint[len("models:/"):].replace("/", "-v")


def accuracy_chart(scores: Scores, path: str, title: str) -> None:
    """Bar chart (PNG) of accuracy by category, the model beside its blind baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [r.category for r in scores.rows] + ["all"]
    model = [r.accuracy for r in scores.rows] + [scores.accuracy]
    blind = [r.blind_accuracy or 0.0 for r in scores.rows] + [scores.blind_accuracy or 0.0]
    xs = range(len(cats))
    fig, ax = plt.subplots(figsize=(1.3 * len(cats) + 2, 4))
    ax.bar([x - 0.2 for x in xs], model, width=0.4, label="model (with image)")
    if scores.blind_accuracy is not None:
        ax.bar([x + 0.2 for x in xs], blind, width=0.4, label="blind (image withheld)")
    ax.set_xticks(list(xs), cats)
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


#: Where an answer-key row holds its answer: ours, LLaVA's POPE annotations, its GPT-4 references.
ANSWER_KEY_FIELDS = ("answer", "label", "text")


def answer_key(rows: list[dict[str, Any]], questions: list[dict[str, Any]], uri: str) -> dict[str, dict[str, Any]]:
    """The answer key for the asked questions: ``question_id -> {"answer", "category", ...}``, the
    answer taken from ``answer``, ``label`` (POPE's ``coco_pope_*.json``) or ``text`` (LLaVA-Bench's
    ``answers_gpt4.jsonl``), the category from the row or else from the question file.

    Raises:
        EvalError: the key covers no asked question, a row has no ``question_id`` or no answer, or
            a question id appears twice (e.g. POPE's split files concatenated with clashing ids).
    """
    asked = {str(q["question_id"]): q for q in questions}
    key: dict[str, dict[str, Any]] = {}
    for n, row in enumerate(rows, 1):
        if "question_id" not in row:
            raise EvalError(f"the answer key {uri} row {n} has no `question_id`")
        qid = str(row["question_id"])
        if qid not in asked:
            continue
        if qid in key:
            raise EvalError(f"the answer key {uri} has question_id {qid} twice (row {n})")
        found = next((f for f in ANSWER_KEY_FIELDS if row.get(f) is not None), None)
        if found is None:
            raise EvalError(f"the answer key {uri} has no `answer` (nor `label`, `text`) for question {qid}")
        category = row.get("category", asked[qid].get("category", "all"))
        key[qid] = {**row, "answer": row[found], "category": str(category)}
    if not key:
        raise EvalError(f"the answer key {uri} covers none of the {len(questions)} questions")
    return key


def judge_inputs(judge: JudgeConfig, st: StorageConfig) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The judge's context (by image) and rule files, read before any answer is generated.

    Raises:
        EvalError: a file is missing or not in LLaVA's format.
    """
    contexts = None
    if judge.context:
        contexts = {str(row.get("image")): row for row in read_jsonl(judge.context, st, "judge context")}
    rules = None
    if judge.rules:
        try:
            rules = read_rules(storage.read_bytes(judge.rules, st))
        except (OSError, ValueError) as e:
            raise EvalError(f"judge.rules {judge.rules}: {e}") from e
    return contexts, rules


def _judge(judge: JudgeConfig, st: StorageConfig, questions: list[dict[str, Any]], key: dict[str, dict[str, Any]],
           answers: list[dict[str, Any]], contexts: dict[str, Any] | None, rules: dict[str, Any] | None) -> JudgeSummary:
    """The LLaVA-Bench review of every answered question the key has a reference for."""
    by_id = {str(q["question_id"]): q for q in questions}
    items = []
    for a in answers:
        qid = str(a["question_id"])
        if qid in key:
            ref = key[qid]
            image = by_id[qid].get("image")
            if contexts is not None and str(image) not in contexts:  # LLaVA's script stops here too
                raise EvalError(f"judge.context has no entry for image {image!r} (question {qid})")
            if rules is not None and rule_for(rules, ref["category"]) is None:
                raise EvalError(f"judge.rules has no rule for category {ref['category']!r} (llava_bench_"
                                f"{ref['category']}, {ref['category']} or default)")
            items.append({"question_id": a["question_id"], "category": ref["category"], "question": by_id[qid]["text"],
                          "image": image, "reference": first_answer(ref), "answer": a["text"],
                          "answer1_id": ref.get("answer_id", a["question_id"]), "answer2_id": a["answer_id"]})
    api_key = judge.api_key.get_secret_value() if judge.api_key else os.environ.get("OPENAI_API_KEY")
    return review_answers(items, judge.base_url, judge.model, api_key, max_tokens=judge.max_tokens,
                          temperature=judge.temperature, contexts=contexts, rules=rules)


def answer_records(rows: list[dict[str, Any]], questions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Answer rows in the form of LLaVA's ``model_vqa.py`` answers files, which its scripts
    (``eval_pope.py``, ``summarize_gpt_review.py``) read: ``question_id`` as the question file has it
    (an int stays an int; rows carry it as a string through Ray Data), ``metadata`` an object."""
    typed = {str(q["question_id"]): q["question_id"] for q in questions}
    return [{**{k: r[k] for k in ANSWER_FIELDS}, "question_id": typed[r["question_id"]],
             "metadata": json.loads(r["metadata"])} for r in rows]


def run_evaluation(job: EvalJobConfig) -> EvalResult:
    """Generate, score, review and log one evaluation.

    Raises:
        EvalError: unreadable inputs, or an answer key that covers none of the questions.
    """
    from llava_platform.ray_utils import init_ray
    from llava_platform.tracking.models import producing_run_id
    from llava_platform.tracking.runs import RunLogger, ensure_run, flatten, tracking_uri, use_tracking_uri

    t0 = time.time()
    cfg, st = job.eval, job.storage
    cfg = cfg.model_copy(update={"output_dir": storage.output_location(cfg.output_dir, "eval.output_dir")})
    questions = read_questions(cfg.questions, st)
    key = None
    if cfg.answers_key:
        key = answer_key(read_jsonl(cfg.answers_key, st, "answer key"), questions, cfg.answers_key)
    judged_with = judge_inputs(cfg.judge, st) if cfg.judge is not None else (None, None)
    uri = tracking_uri(job.tracking)
    use_tracking_uri(uri)
    init_ray()
    model_id = model_id_of(job.model)
    print(f"[eval] {len(questions)} questions, model {model_id}, {cfg.num_actors} actor(s), batch {cfg.batch_size}"
          + (", with the blind baseline" if cfg.blind_baseline else ""), flush=True)
    rows = generate_answers(questions, job.model, cfg, st, model_id, uri)
    answers = [r for r in rows if r["mode"] == "image"]
    blind = [r for r in rows if r["mode"] == "blind"] if cfg.blind_baseline else None
    errors = [r for r in rows if r["error"]]
    scores = score_answers(answers, key, blind, cfg.yes_no_categories, cfg.yes_no_parsing) if key else None
    records = answer_records(answers, questions)  # what answers.jsonl holds, and what the judge reviews
    judge = None
    if cfg.judge is not None and key:
        judge = _judge(cfg.judge, st, questions, key, records, *judged_with)

    with tempfile.TemporaryDirectory() as tmp:
        # Every output is written once, here; the same directory goes to output_dir and to MLflow.
        local = os.path.join(tmp, "eval")
        os.makedirs(local)

        def put(name: str, data: bytes) -> None:
            with open(os.path.join(local, name), "wb") as f:
                f.write(data)

        put("answers.jsonl", _jsonl(records))
        if blind is not None:
            put("answers_blind.jsonl", _jsonl(answer_records(blind, questions)))
        if errors:
            put("errors.jsonl", _jsonl([{"question_id": a["question_id"], "mode": r["mode"], "error": r["error"]}
                                        for a, r in zip(answer_records(errors, questions), errors)]))
        metrics: dict[str, float] = {"answers": float(len(answers)), "answer_errors": float(len(errors))}
        if scores is not None:
            metrics.update(scores.metrics())
            put("per_category.md", (scores.table() + "\n").encode())
            if scores.pope is not None:
                put("pope.md", (scores.pope_table() + "\n").encode())
            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(["category", "questions", "accuracy", "blind_accuracy"])
            for r in scores.rows:
                writer.writerow([r.category, r.n, f"{r.accuracy:.4f}",
                                 "" if r.blind_accuracy is None else f"{r.blind_accuracy:.4f}"])
            put("per_category.csv", buf.getvalue().encode())
            accuracy_chart(scores, os.path.join(local, "accuracy_by_category.png"), f"{model_id}: accuracy by category")
        if judge is not None:
            metrics.update(judge.metrics())
            put("reviews.jsonl", _jsonl(judge.llava_rows()))  # LLaVA's review-file rows
            put("judge.md", (judge.table() + "\n").encode())
        put("scores.json", json.dumps(metrics, indent=2).encode())
        storage.upload_dir(local, cfg.output_dir, st)

        parent = producing_run_id(job.model.checkpoint, st)
        tags = {"llava_platform.kind": "evaluation", "evaluated_model": job.model.checkpoint or model_id}
        if parent:
            tags.update({"mlflow.parentRunId": parent, "evaluated_run_id": parent})
        run_key = f"eval:{job.model.checkpoint or model_id}:{cfg.questions}:{time.time_ns()}"
        params = flatten(job.model_dump(mode="json", exclude={"tracking": True}))
        run_id = ensure_run(job.tracking, uri, run_key, f"eval-{model_id}", params, tags)
        logger = RunLogger(uri, run_id)
        logger.metrics(metrics, step=0)
        logger.artifacts(local, "eval")
        logger.finish()
    result = EvalResult(scores, judge, cfg.output_dir, len(answers), len(errors), run_id, round(time.time() - t0, 1))
    print(result.summary(), flush=True)
    return result
