"""The MFU numerator: the formula's FLOPs of a training step against torch's FLOP counter on the tiny
LLaVA running that step, per stage; and the peak lookup behind the denominator."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava_platform.train.freezing import apply_stage
from llava_platform.model.presets import build_preset
from llava_platform.train.flops import LlavaFlops, peak_flops


def counted_step(model, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    return counter.get_total_flops()


def llava_batch(model, rows: int, length: int, images_per_row: int, pad: int = 0):
    n_img = model.config.image_seq_length
    ids = torch.randint(5, model.config.text_config.vocab_size, (rows, length))
    for i in range(images_per_row):
        ids[:, 2 + i * n_img:2 + (i + 1) * n_img] = model.config.image_token_id
    mask = torch.ones_like(ids)
    if pad:
        mask[0, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone(),
            "pixel_values": torch.randn(rows * images_per_row, 3, 32, 32)}


@pytest.mark.parametrize("stage,unfreeze", [("pretrain", False), ("finetune", False), ("finetune", True)])
@pytest.mark.parametrize("length,images", [(40, 1), (100, 2)])
def test_step_flops_match_torch_counter(stage, unfreeze, length, images):
    torch.manual_seed(0)
    model, _ = build_preset("tiny", seed=0)
    apply_stage(model, stage, unfreeze_vision_tower=unfreeze)
    # torch's counter does not see inside the CPU SDPA kernel; eager attention is plain matmuls.
    model.set_attn_implementation("eager")
    batch = llava_batch(model, rows=2, length=length, images_per_row=images)
    expected = counted_step(model, batch)
    # Frozen tower: only norms, biases and softmax are left out. A training tower: the patch conv's
    # input gradient (of the pixels) is counted though never computed.
    assert LlavaFlops.of(model).batch(batch) == pytest.approx(expected, rel=0.01 if not unfreeze else 0.04)


def test_stage1_costs_less_than_stage2_by_the_weight_gradients():
    s1, _ = build_preset("tiny", seed=0)
    apply_stage(s1, "pretrain")
    s2, _ = build_preset("tiny", seed=0)
    apply_stage(s2, "finetune")
    f1, f2 = LlavaFlops.of(s1), LlavaFlops.of(s2)
    assert f1.language.trainable == 0 and f2.language.trainable == f2.language.params > 0
    assert f2.step([50], 1) - f1.step([50], 1) == 2 * f2.language.params * 50


def test_lora_counts_the_projector_copy_that_trains_once():
    from llava_platform.config.schema import LoraConfig
    from llava_platform.train.objectives import apply_lora

    model, _ = build_preset("tiny", seed=0)
    apply_stage(model, "finetune")
    plain = LlavaFlops.of(model)
    wrapped = LlavaFlops.of(apply_lora(model, LoraConfig()))
    assert wrapped.projector == plain.projector
    assert wrapped.vision == plain.vision
    assert wrapped.language.trainable > 0 and wrapped.language.params > plain.language.params  # the adapters run too


def test_padding_is_not_counted():
    model, _ = build_preset("tiny", seed=0)
    apply_stage(model, "finetune")
    f = LlavaFlops.of(model)
    padded = llava_batch(model, rows=2, length=60, images_per_row=1, pad=20)
    assert f.batch(padded) == f.step([40, 60], 2)


def test_peak_flops(monkeypatch):
    assert peak_flops("fp32", override_tflops=2.5) == (2.5e12, "train.peak_tflops")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_flops("bf16")[0] is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, tflops in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                         ("NVIDIA L4", 121.0), ("NVIDIA L40", None), ("NVIDIA A10G", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        peak, why = peak_flops("bf16")
        assert peak == (tflops * 1e12 if tflops else None), (name, why)
        assert (name in why) and (tflops is not None or "train.peak_tflops" in why)
    assert peak_flops("fp32")[0] is None
