"""The original LLaVA code's checkpoint layout, in and out, with LLaVA's logits kept."""

from __future__ import annotations

import json

import pytest
import torch

from llava_platform.errors import ModelBuildError
from llava_platform.model.presets import build_preset
from llava_platform.model.original import export_original, import_original, import_projector


def _original_checkpoint(tmp_path, seed=5):
    """An original-layout LLaVA-1.5 checkpoint written by hand (not by our exporter): a Llama's
    weights as model.* / lm_head, a random mlp2x_gelu projector as model.mm_projector.0/2, the mm_*
    config fields, the tokenizer; the CLIP tower in its own folder named by mm_vision_tower."""
    from safetensors.torch import save_file

    model, processor = build_preset("tiny", seed=seed)
    tower_dir = tmp_path / "clip"
    model.model.vision_tower.save_pretrained(tower_dir)
    processor.image_processor.save_pretrained(tower_dir)
    g = torch.Generator().manual_seed(seed)
    v, t = model.config.vision_config.hidden_size, model.config.text_config.hidden_size
    projector = {"model.mm_projector.0.weight": torch.randn(t, v, generator=g), "model.mm_projector.0.bias": torch.randn(t, generator=g),
                 "model.mm_projector.2.weight": torch.randn(t, t, generator=g), "model.mm_projector.2.bias": torch.randn(t, generator=g)}
    weights = {f"model.{k}": w.clone() for k, w in model.model.language_model.state_dict().items()}
    weights["lm_head.weight"] = model.lm_head.weight.detach().clone()
    ckpt = tmp_path / "llava-original"
    ckpt.mkdir()
    save_file({**weights, **projector}, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.text_config.to_dict()
    config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", mm_vision_tower=str(tower_dir),
                  mm_hidden_size=v, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", image_aspect_ratio="pad", mm_use_im_start_end=False,
                  mm_use_im_patch_token=False, mm_patch_merge_type="flat", tune_mm_mlp_adapter=False)
    (ckpt / "config.json").write_text(json.dumps(config))
    processor.tokenizer.save_pretrained(ckpt)
    torch.save({"not": "weights"}, ckpt / "training_args.bin")  # HF Trainer leaves one in every output folder
    return ckpt, model, processor, projector


def _llava_reference_logits(model, projector, ids_before, ids_after, pixels):
    """What LLaVA's LlavaMetaForCausalLM computes, by hand: CLIP's penultimate hidden states without
    CLS -> Linear, GELU, Linear -> spliced in place of the image token -> the Llama."""
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        feats = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        h = torch.nn.functional.linear(feats, projector["model.mm_projector.0.weight"], projector["model.mm_projector.0.bias"])
        h = torch.nn.functional.linear(torch.nn.functional.gelu(h), projector["model.mm_projector.2.weight"],
                                       projector["model.mm_projector.2.bias"])
        llama = LlamaForCausalLM(model.config.text_config).eval()
        llama.model.load_state_dict(model.model.language_model.state_dict())
        llama.lm_head.load_state_dict(model.lm_head.state_dict())
        embed = llama.get_input_embeddings()
        x = torch.cat([embed(torch.tensor([ids_before])), h, embed(torch.tensor([ids_after]))], dim=1)
        return llama(inputs_embeds=x).logits


def test_an_original_llava_checkpoint_imports_with_llavas_logits(tmp_path):
    ckpt, model, processor, projector = _original_checkpoint(tmp_path)
    imported, proc = import_original(str(ckpt))
    imported.eval()
    tok = proc.tokenizer
    n = imported.config.image_seq_length
    before, after = [tok.bos_token_id, *tok("USER:", add_special_tokens=False).input_ids], tok(" what? ASSISTANT:", add_special_tokens=False).input_ids
    ids = before + [imported.config.image_token_id] * n + after
    pixels = torch.randn(1, 3, imported.config.vision_config.image_size, imported.config.vision_config.image_size,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = imported(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
    ref = _llava_reference_logits(model.eval(), projector, before, after, pixels)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # The override wins over mm_vision_tower; a missing tower is a clear error.
    with pytest.raises(ModelBuildError, match="CLIP vision tower"):
        import_original(str(ckpt), vision_tower=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("projector_type", ["mlp2x_gelu", "linear"])
def test_export_to_the_original_layout_and_back_keeps_the_logits(tmp_path, projector_type):
    from safetensors import safe_open

    model, processor = build_preset("tiny", seed=7, projector_type=projector_type)
    with torch.no_grad():  # a trained linear projector has a non-identity second layer: it must fold into one
        model.model.multi_modal_projector.linear_2.weight.add_(0.1 * torch.randn_like(model.model.multi_modal_projector.linear_2.weight))
    out = export_original(model.eval(), processor, str(tmp_path / "orig"))
    config = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaForCausalLM"] and config["mm_projector_type"] == projector_type
    assert config["mm_vision_select_layer"] == -2 and config["mm_vision_select_feature"] == "patch"
    assert config["rope_theta"] == 10000.0 and "rope_parameters" not in config  # the fields LLaVA's transformers reads
    with safe_open(str(tmp_path / "orig" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys and "model.layers.0.self_attn.q_proj.weight" in keys
    assert {k for k in keys if "mm_projector" in k} == (
        {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")} if projector_type == "mlp2x_gelu"
        else {"model.mm_projector.weight", "model.mm_projector.bias"})
    with safe_open(str(tmp_path / "orig" / "vision_tower" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("vision_model.") for k in f.keys())  # CLIP's hub layout, as LLaVA loads towers
    back, proc = import_original(out)
    ids = torch.tensor([[proc.tokenizer.bos_token_id] + [model.config.image_token_id] * model.config.image_seq_length + [5, 6, 7]])
    pixels = torch.randn(1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids=ids, pixel_values=pixels).logits,
                                   model(input_ids=ids, pixel_values=pixels).logits, rtol=1e-4, atol=1e-4)


def test_stage_ones_mm_projector_bin_composes_onto_a_tower_and_an_llm(tmp_path):
    ckpt, model, processor, projector = _original_checkpoint(tmp_path)
    llm_dir = tmp_path / "llm"
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(model.config.text_config)
    llama.model.load_state_dict(model.model.language_model.state_dict())
    llama.lm_head.load_state_dict(model.lm_head.state_dict())
    llama.save_pretrained(llm_dir)
    processor.tokenizer.save_pretrained(llm_dir)
    torch.save(projector, tmp_path / "mm_projector.bin")  # what LLaVA's pretrain.sh leaves
    composed, _ = import_projector(str(tmp_path / "mm_projector.bin"), str(tmp_path / "clip"), str(llm_dir))
    proj = composed.model.multi_modal_projector
    assert torch.equal(proj.linear_1.weight, projector["model.mm_projector.0.weight"])
    assert torch.equal(proj.linear_2.bias, projector["model.mm_projector.2.bias"])
    torch.save({"model.mm_projector.0.weight": projector["model.mm_projector.0.weight"]}, tmp_path / "partial.bin")
    with pytest.raises(ModelBuildError, match="needs model.mm_projector"):
        import_projector(str(tmp_path / "partial.bin"), str(tmp_path / "clip"), str(llm_dir))


def test_original_settings_without_an_equivalent_are_refused(tmp_path):
    ckpt, *_ = _original_checkpoint(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    for change, match in (({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
                          ({"image_aspect_ratio": "anyres"}, "anyres"),
                          ({"mm_projector_type": "mlp3x_gelu"}, "mlp3x_gelu"),
                          ({"mm_vision_tower": None}, "--vision-tower")):
        (ckpt / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ModelBuildError, match=match):
            import_original(str(ckpt))
