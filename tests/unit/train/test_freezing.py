"""LLaVA's freezing per stage: the counts it reports, and one optimizer step that changes exactly the
stage's parameters (the rest bitwise equal)."""

import json

import pytest
import torch

from llava_platform.data.sample import LlavaCollator, SampleSpec, encode_record
from llava_platform.model.builder import describe
from llava_platform.model.presets import build_preset
from llava_platform.train.freezing import apply_stage
from llava_platform.train.step import optimizer_step, trainable_parameters


def test_apply_stage_counts():
    model, _ = build_preset("tiny")
    d = describe(model)["params"]
    c1 = apply_stage(model, "pretrain")
    assert c1["trainable"] == c1["projector_trainable"] == d["projector"]
    c2 = apply_stage(model, "finetune")
    assert c2["trainable"] == d["projector"] + d["language_model"] and c2["vision_tower_trainable"] == 0
    c3 = apply_stage(model, "finetune", unfreeze_vision_tower=True)
    assert c3["trainable"] == c3["total"]
    with pytest.raises(ValueError, match="unknown stage"):
        apply_stage(model, "stage3")


@pytest.mark.parametrize(
    "stage, fname, template, trained",
    [
        ("pretrain", "pretrain.json", "plain", {"model.multi_modal_projector."}),
        ("finetune", "instruct.json", "llava_v1", {"model.multi_modal_projector.", "model.language_model.", "lm_head."}),
    ],
)
def test_one_step_changes_exactly_the_stage_parameters(synth_dir, stage, fname, template, trained):
    model, processor = build_preset("tiny", seed=0)
    apply_stage(model, stage)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    spec = SampleSpec.from_processor(processor, model.config, template, max_length=256)
    recs = json.loads((synth_dir / fname).read_text())[:4]
    samples = [encode_record(r, (synth_dir / "images" / r["image"]).read_bytes(), processor.tokenizer, spec) for r in recs]
    ip = processor.image_processor
    batch = LlavaCollator(processor.tokenizer.pad_token_id, ip.image_mean, ip.image_std)(samples)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    loss = optimizer_step(model, batch, opt)
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    for name, p in model.named_parameters():
        should_train = name.startswith(tuple(trained))
        if should_train:
            assert not torch.equal(p, before[name]), f"{name} should have changed in {stage}"
        else:
            assert torch.equal(p, before[name]), f"{name} must stay bitwise equal in {stage}"
