"""A LLaVA that learns to see, through the real path: stage 0's parts on Ray Train + DeepSpeed, composed
with ``model build``'s code, stage 1 (projector) and stage 2 (projector + LLM, tower frozen) on Ray Train
+ DeepSpeed with 2 workers, then the eval job with its blind baseline on held-out scenes.

To fit in ~3 minutes on 2 cores, the world holds one shape per image and stage 2 trains on colour
questions only (a data mix); the held-out colour questions are the eval job's own, on unseen images.
The blind baseline (image withheld) stays near chance (six colours): what the model gets right, it
gets from the image. Telling several shapes apart needs the demo's longer stage 0 (see the README).
"""

import json
import random

import pytest

from llava_platform.config import EvalJobConfig, load_config
from llava_platform.data import scenes, synthetic
from llava_platform.demo import train_embedded_default
from llava_platform.eval.evaluate import run_evaluation

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Small parts; one image token per grid cell (96 px, patches of 32).
COMPONENTS = ["vision_tower.hidden_size=64", "vision_tower.layers=2", "vision_tower.heads=2",
              "vision_tower.text_hidden_size=64", "vision_tower.projection_dim=64",
              "language_model.hidden_size=64", "language_model.layers=2", "language_model.heads=2",
              "language_model.vocab_size=512"]


def colour_instruct(world, rng):
    """One record per training scene: every shape's colour asked, each shape named by what singles it out."""
    records = []
    for i, line in enumerate((world / "scenes.jsonl").read_text().splitlines()):
        row = json.loads(line)
        scene = scenes.scene_from_record(row)
        turns = []
        for j, s in enumerate(rng.sample(scene.shapes, len(scene.shapes))):
            q = f"What colour is the {synthetic.colour_referent(scene, s)}?\n{synthetic.SHORT}"
            turns += [{"from": "human", "value": f"<image>\n{q}" if j == 0 else q}, {"from": "gpt", "value": s.colour}]
        records.append({"id": f"colour-{i:06d}", "image": row["image"], "conversations": turns})
    return records


def test_llava_learns_colour_from_the_image(ray_cluster, tmp_path):
    world = tmp_path / "world"
    synthetic.write_dataset(world, n=1000, seed=5, n_eval=60, shape_counts=(1,))
    instruct = tmp_path / "colour.json"
    instruct.write_text(json.dumps(colour_instruct(world, random.Random(0))))
    questions = [json.loads(x) for x in (world / "eval" / "questions.jsonl").read_text().splitlines()]
    colour_q = tmp_path / "colour_questions.jsonl"
    colour_q.write_text("".join(json.dumps(q) + "\n" for q in questions if q["category"] == "colour"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    facts = train_embedded_default(tmp_path, world, uri, steps=20, finetune_steps=250, tower_steps=120, lm_steps=40,
                                   components=COMPONENTS, instruct=instruct, experiment="learning")
    gap = facts["pretrain"]["image_vs_blank"]
    evaluation = run_evaluation(load_config(None, EvalJobConfig, [
        f"model.checkpoint={facts['finetune']['export']}", f"eval.questions={colour_q}",
        f"eval.image_root={world / 'eval' / 'images'}", f"eval.answers_key={world / 'eval' / 'answers_key.jsonl'}",
        f"eval.output_dir={tmp_path / 'eval'}", "eval.max_new_tokens=4", "eval.batch_size=32",
        "eval.cpus_per_actor=1", f"tracking.tracking_uri={uri}", "tracking.experiment=learning"]))
    m = evaluation.scores.metrics()
    print(json.dumps({"eval": m, "image_vs_blank": gap, "times": facts["times"]}))
    assert evaluation.answers == 60
    assert m["accuracy.colour"] >= 0.80, m
    assert m["blind_accuracy.colour"] <= 0.40, m
