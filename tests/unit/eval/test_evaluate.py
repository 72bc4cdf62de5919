"""The evaluation job end to end on the session's Ray cluster and a real MLflow server."""

from __future__ import annotations

import json
import shutil

import pytest

from llava_platform.config.loader import load_config
from llava_platform.config.schema import EvalJobConfig, ModelSpec
from llava_platform.eval.evaluate import answer_key, answer_records, model_id_of, run_evaluation
from llava_platform.eval.generate import EvalError


def _job(model_dir, synth_dir, out, tracking, extra=()):
    return load_config(None, EvalJobConfig, [
        f"model.checkpoint={model_dir}", f"eval.questions={synth_dir / 'eval' / 'questions.jsonl'}",
        f"eval.image_root={synth_dir / 'eval' / 'images'}", f"eval.answers_key={synth_dir / 'eval' / 'answers_key.jsonl'}",
        f"eval.output_dir={out}", "eval.batch_size=16", "eval.max_new_tokens=4", "eval.cpus_per_actor=0.5",
        f"tracking.tracking_uri={tracking}", "tracking.experiment=eval-test", *extra])


@pytest.mark.ray
def test_evaluation_writes_answers_scores_chart_and_a_nested_mlflow_run(ray_cluster, mlflow_server, tiny_model_dir,
                                                                         synth_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.create_experiment("training-for-eval")
    parent = client.create_run(exp, run_name="stage2").info.run_id
    model_dir = tmp_path / "export"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "training_info.json").write_text(json.dumps({"mlflow_run_id": parent}))

    result = run_evaluation(_job(model_dir, synth_dir, tmp_path / "out", mlflow_server))
    questions = (synth_dir / "eval" / "questions.jsonl").read_text().splitlines()
    assert result.answers == len(questions) == 50 and result.errors == 0
    out = tmp_path / "out"
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [json.loads(q)["question_id"] for q in questions]
    assert set(answers[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert answers[0]["metadata"]["finish_reason"] in ("length", "stop")  # an object, as model_vqa.py writes
    assert len((out / "answers_blind.jsonl").read_text().splitlines()) == 50
    assert (out / "accuracy_by_category.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| colour | 10 |" in (out / "per_category.md").read_text()

    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["evaluated_run_id"] == parent
    assert {"accuracy", "blind_accuracy", "accuracy.colour", "blind_accuracy.shape", "pope.f1"} <= set(run.data.metrics)
    assert run.data.metrics["accuracy"] == result.scores.accuracy
    names = {f.path for f in client.list_artifacts(result.mlflow_run_id, "eval")}
    assert {"eval/accuracy_by_category.png", "eval/per_category.csv", "eval/answers.jsonl",
            "eval/answers_blind.jsonl", "eval/scores.json"} <= names


def test_answer_key_that_covers_no_question_is_refused(synth_dir, tmp_path):
    key = tmp_path / "key.jsonl"
    key.write_text(json.dumps({"question_id": "other", "answer": "x"}) + "\n")
    job = _job("m", synth_dir, tmp_path / "out", f"sqlite:///{tmp_path / 'db'}", [f"eval.answers_key={key}"])
    with pytest.raises(EvalError, match="covers none"):
        run_evaluation(job)


def test_answers_files_keep_the_question_files_id_types_and_metadata_is_an_object():
    # LLaVA's model_vqa.py writes question_id as read (POPE's and LLaVA-Bench's are ints) and
    # metadata as an object; eval_pope.py looks answers up in a dict keyed by the typed ids.
    questions = [{"question_id": 7, "text": "a"}, {"question_id": "x-1", "text": "b"}, {"question_id": 0, "text": "c"}]
    rows = [{"question_id": str(q["question_id"]), "prompt": q["text"], "text": "yes", "answer_id": "id",
             "model_id": "m", "metadata": json.dumps({"completion_tokens": 1, "finish_reason": "stop"}),
             "mode": "image", "error": None} for q in questions]
    out = answer_records(rows, questions)
    assert [a["question_id"] for a in out] == [7, "x-1", 0]
    assert all(a["metadata"] == {"completion_tokens": 1, "finish_reason": "stop"} for a in out)
    assert set(out[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    by_id = {q["question_id"]: q for q in questions}  # what eval_pope.py builds from the question file
    assert all(a["question_id"] in by_id for a in json.loads("[" + ",".join(json.dumps(a) for a in out) + "]"))


def test_the_answer_key_reads_llavas_pope_labels_and_gpt4_references():
    questions = [{"question_id": 1, "text": "Is there a dog?", "category": "adversarial"},
                 {"question_id": 2, "text": "Describe it.", "category": "conv"}, {"question_id": 3, "text": "x"}]
    rows = [{"question_id": 1, "label": "no"},  # coco_pope_adversarial.json: the split is in the question file
            {"question_id": 2, "text": "A dog on a sofa.", "answer_id": "a"},  # answers_gpt4.jsonl
            {"question_id": 3, "answer": "red", "category": "colour"}, {"question_id": 99, "answer": "not asked"}]
    key = answer_key(rows, questions, "key.jsonl")
    assert {q: (e["answer"], e["category"]) for q, e in key.items()} == {
        "1": ("no", "adversarial"), "2": ("A dog on a sofa.", "conv"), "3": ("red", "colour")}
    with pytest.raises(EvalError, match=r"no `answer` \(nor `label`, `text`\) for question 2"):
        answer_key([{"question_id": 2, "answer_id": "a"}], questions, "key.jsonl")
    with pytest.raises(EvalError, match="question_id 1 twice"):  # e.g. POPE split files with clashing ids
        answer_key([{"question_id": 1, "label": "no"}, {"question_id": 1, "label": "yes"}], questions, "key.jsonl")
    with pytest.raises(EvalError, match="row 1 has no `question_id`"):
        answer_key([{"label": "no"}], questions, "key.jsonl")


def test_the_judge_refuses_a_context_or_rule_file_that_misses_a_question():
    # eval_gpt_review_bench.py fails on a missing image context (KeyError) or rule (assert); so do we,
    # naming what is missing, before any judge call.
    from llava_platform.config.schema import JudgeConfig
    from llava_platform.eval.evaluate import _judge

    questions = [{"question_id": 1, "text": "What is it?", "image": "001.jpg", "category": "conv"}]
    key = {"1": {"answer": "A cat.", "category": "conv"}}
    answers = [{"question_id": 1, "text": "A dog.", "answer_id": "a1"}]
    judge = JudgeConfig(base_url="http://127.0.0.1:9/v1", model="m")
    with pytest.raises(EvalError, match="no entry for image '001.jpg'"):
        _judge(judge, None, questions, key, answers, {"002.jpg": {"caption": "x"}}, None)
    with pytest.raises(EvalError, match="no rule for category 'conv'"):
        _judge(judge, None, questions, key, answers, None, {"llava_bench_detail": {"prompt": "p"}})


def test_model_ids():
    assert model_id_of(ModelSpec(checkpoint="models:/llava/3")) == "llava-v3"
    assert model_id_of(ModelSpec(checkpoint="/x/models/finetune/")) == "finetune"
