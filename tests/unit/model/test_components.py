import torch
from transformers import AutoModelForCausalLM, CLIPVisionModel

from llava_platform.config.components import LanguageModelSpec, VisionTowerSpec
from llava_platform.config.schema import ModelSpec
from llava_platform.model.builder import build_model
from llava_platform.model.components import build_language_model, build_vision_pretraining_model, save_vision_tower

SPEC = VisionTowerSpec(hidden_size=32, layers=2, heads=2, text_hidden_size=32, projection_dim=32)


def batch(n=4, vocab=100):
    g = torch.Generator().manual_seed(0)
    cells = torch.zeros(n, 9, dtype=torch.long)
    cells[:, 4] = torch.randint(1, 37, (n,), generator=g)
    return {"pixel_values": torch.randn(n, 3, 96, 96, generator=g), "input_ids": torch.cat([torch.randint(0, vocab - 1, (n, 6), generator=g),
                                                                      torch.full((n, 1), vocab - 1)], 1),
            "attention_mask": torch.ones(n, 7, dtype=torch.long), "cell_targets": cells}


def test_vision_pretraining_loss_combines_its_three_terms_and_trains():
    torch.manual_seed(0)
    model = build_vision_pretraining_model(SPEC, vocab_size=100, eos_token_id=99, num_cell_classes=37)
    b = batch()
    out = model(**b)
    expected = out.contrastive_loss + out.cell_loss + 0.5 * out.position_loss
    assert torch.allclose(out.loss, expected)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = out.loss.item()
    for _ in range(30):
        opt.zero_grad()
        loss = model(**b).loss
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.7, (first, loss.item())
    # the features LLaVA takes: one per patch of the 3x3 grid, CLS dropped
    assert model.patch_features(b["pixel_values"]).shape == (4, 9, 32)


def test_without_the_contrastive_term_only_what_the_dense_objective_reaches_trains():
    spec = SPEC.model_copy(update={"contrastive_weight": 0.0})
    torch.manual_seed(0)
    model = build_vision_pretraining_model(spec, vocab_size=100, eos_token_id=99, num_cell_classes=37)
    ran = []
    for i, layer in enumerate(model.clip.vision_model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: ran.append(i))
    out = model(**batch())
    assert ran == [0]  # the layer above the feature layer does not run: nothing reads it
    assert out.contrastive_loss is None
    assert torch.allclose(out.loss, out.cell_loss + 0.5 * out.position_loss)
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # every trainable parameter gets a gradient (DeepSpeed reduces them all), and only those
    assert trainable == {n for n, p in model.named_parameters() if p.grad is not None}
    # the feature layer is hidden state -2 of 2 layers: layer 0 trains, layer 1 and the text tower do not
    assert any(n.startswith("clip.vision_model.encoder.layers.0.") for n in trainable)
    assert not any(n.startswith(("clip.vision_model.encoder.layers.1.", "clip.text_model.")) for n in trainable)
    assert {"cell_head.weight", "position_head.weight"} <= trainable


def test_saved_parts_compose_into_llava_like_clip_and_vicuna(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    tower = build_vision_pretraining_model(SPEC, vocab_size=len(tiny_tokenizer), eos_token_id=tiny_tokenizer.eos_token_id,
                                           num_cell_classes=37)
    save_vision_tower(tower, SPEC, str(tmp_path / "vt"))
    loaded = CLIPVisionModel.from_pretrained(tmp_path / "vt")
    px = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        same = loaded(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.allclose(same, tower.patch_features(px), atol=1e-5)
    lm = build_language_model(LanguageModelSpec(hidden_size=32, layers=2, heads=2), tiny_tokenizer)
    lm.save_pretrained(tmp_path / "lm")
    tiny_tokenizer.save_pretrained(tmp_path / "lm")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "lm").config.hidden_size == 32
    model, processor = build_model(ModelSpec(vision_tower=str(tmp_path / "vt"), llm=str(tmp_path / "lm")))
    assert model.config.image_seq_length == 9 and processor.image_processor.crop_size["height"] == 96
    assert torch.equal(model.model.vision_tower.embeddings.patch_embedding.weight,
                       loaded.embeddings.patch_embedding.weight)
