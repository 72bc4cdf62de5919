"""The objectives the shared worker loop trains (no Ray here: a model is its own module)."""

import json

import pytest
import torch
from pydantic import ValidationError

from llava_platform.config import TrainJobConfig, load_config
from llava_platform.config.components import ComponentRunConfig
from llava_platform.data.sample import SampleSpec, encode_record
from llava_platform.train.objectives import LlavaObjective, VisionTowerObjective, make_objective
from llava_platform.train.worker import WorkerArgs


def llava_job(tmp_path, *extra):
    return load_config(None, TrainJobConfig, [
        "name=t", "model.preset=tiny", f"prepared_data={tmp_path}", f"storage_path={tmp_path}",
        f"output_path={tmp_path / 'out'}", "train.stage=pretrain", "train.global_batch_size=2",
        "train.micro_batch_size=2", "train.lr=1e-3", "train.precision=fp32", *extra])


def rows(synth_dir, processor, config, n=2):
    spec = SampleSpec.from_processor(processor, config, "plain", max_length=256)
    recs = json.loads((synth_dir / "pretrain.json").read_text())[:n]
    return [encode_record(r, (synth_dir / "images" / r["image"]).read_bytes(), processor.tokenizer, spec) for r in recs]


def args(job, **kw):
    return WorkerArgs(objective="llava", job=job, run_name=job.name, total_steps=1, output_path=job.output_path,
                      image_size=32, **kw)


def test_worker_args_must_fit_their_objective(tmp_path):
    with pytest.raises(ValidationError, match="objective"):
        WorkerArgs(objective="nope", job=llava_job(tmp_path), run_name="t", total_steps=1, output_path="o")
    with pytest.raises(ValidationError, match="objective vision_tower does not train a TrainJobConfig"):
        WorkerArgs(objective="vision_tower", job=llava_job(tmp_path), run_name="t", total_steps=1, output_path="o",
                   tokenizer_dir="tok")
    with pytest.raises(ValidationError, match="needs the prepared data's image_size"):
        WorkerArgs(objective="llava", job=llava_job(tmp_path), run_name="t", total_steps=1, output_path="o")


def test_stage1_trains_the_projector_and_probes_real_against_blank_images(tmp_path, synth_dir):
    objective = make_objective(args(llava_job(tmp_path, "train.blank_image_probe=true"), mlflow_run_id="r"))
    assert isinstance(objective, LlavaObjective)
    model, counts = objective.build()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("multi_modal_projector" in n for n in trainable)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = objective.collate(rows(synth_dir, objective.processor, model.config), "cpu")
    probe = objective.probe(model, batch)
    assert set(probe) == {"loss_real_images", "loss_blank_images"}
    assert probe["loss_real_images"] == pytest.approx(objective.loss(model, batch).item(), rel=1e-5)
    assert probe["loss_real_images"] != probe["loss_blank_images"]


def test_no_probe_unless_asked_and_text_only_batches_still_reach_the_projector(tmp_path, synth_dir):
    objective = LlavaObjective(args(llava_job(tmp_path)))
    model, _ = objective.build()
    batch = objective.collate(rows(synth_dir, objective.processor, model.config), "cpu")
    assert objective.probe(model, batch) == {}
    text_only = {k: v for k, v in batch.items() if k != "pixel_values"}
    text_only["input_ids"] = text_only["input_ids"].masked_fill(text_only["input_ids"] == model.config.image_token_id,
                                                                objective.processor.tokenizer.pad_token_id)
    loss = objective.loss(model, text_only)
    loss.backward()
    # the zero vision term: every projector parameter has a gradient (all zeros), as on an image batch
    grads = [p.grad for n, p in model.named_parameters() if "multi_modal_projector" in n]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


def test_vision_tower_objective_reports_its_loss_terms(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    run = ComponentRunConfig.model_validate({
        "name": "vt", "component": "vision_tower", "seed": 0,
        "vision_tower": {"hidden_size": 32, "layers": 1, "heads": 2, "text_hidden_size": 32, "projection_dim": 32},
        "train": {"stage": "vision_tower", "global_batch_size": 2, "micro_batch_size": 2, "lr": 1e-3}})
    objective = VisionTowerObjective(run, str(tmp_path / "tok"))
    model, counts = objective.build()
    assert counts["trainable"] == counts["total"]
    batch = {"pixel_values": torch.randn(2, 3, 96, 96), "input_ids": torch.tensor([[5, 6, tiny_tokenizer.eos_token_id]] * 2),
             "attention_mask": torch.ones(2, 3, dtype=torch.long), "cell_targets": torch.zeros(2, 9, dtype=torch.long)}
    loss = objective.loss(model, batch)
    terms = objective.probe(model, batch)
    assert set(terms) == {"contrastive_loss", "cell_loss", "position_loss"}
    assert loss.item() == pytest.approx(terms["contrastive_loss"] + terms["cell_loss"] + 0.5 * terms["position_loss"],
                                        rel=1e-5)


def test_stage2_trains_the_projector_at_its_own_rate_and_the_llm_group_comes_first(tmp_path):
    objective = LlavaObjective(args(llava_job(tmp_path, "train.stage=finetune", "train.projector_lr=1e-4")))
    model, _ = objective.build()
    llm, projector = objective.param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert llm["lr"] == 1e-3 and not any("multi_modal_projector" in names[id(p)] for p in llm["params"])
    assert projector["lr"] == 1e-4 and all("multi_modal_projector" in names[id(p)] for p in projector["params"])
    # without its own rate the projector follows train.lr
    default = LlavaObjective(args(llava_job(tmp_path, "train.stage=finetune")))
    assert [g["lr"] for g in default.param_groups(default.build()[0])] == [1e-3, 1e-3]
