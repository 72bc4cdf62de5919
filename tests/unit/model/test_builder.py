"""The model builder on tiny components: the same code path that turns CLIP ViT-L/14-336 + Vicuna-7B
into LLaVA-1.5, exercised with models built from config and saved locally or to S3."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from llava_platform import storage
from llava_platform.config.schema import ModelSpec
from llava_platform.data.images import num_image_tokens
from llava_platform.errors import ModelBuildError
from llava_platform.model.builder import build_model, compose, load_checkpoint, save_model
from llava_platform.model.components import default_image_processor
from llava_platform.model.presets import build_preset


def vicuna_like_tokenizer(eos=True) -> PreTrainedTokenizerFast:
    """Like an LLM's own tokenizer: no pad token, no <image> token."""
    specials = ["<unk>", "<s>"] + (["</s>"] if eos else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a red circle", "USER: ASSISTANT: what colour"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    kw = {"eos_token": "</s>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>", **kw)


def save_components(root, image_size=32, patch_size=8, eos=True):
    """A full CLIPModel checkpoint (text + vision, as openai/clip-* ships) and a llama LM + tokenizer."""
    clip_dir, llm_dir = root / "clip", root / "llm"
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(clip_dir)
    default_image_processor(image_size).save_pretrained(clip_dir)
    tok = vicuna_like_tokenizer(eos)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256))
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    return clip_dir, llm_dir


def test_compose_from_local_components(tmp_path):
    clip_dir, llm_dir = save_components(tmp_path)
    model, processor = compose(ModelSpec(vision_tower=str(clip_dir), llm=str(llm_dir)))
    tok = processor.tokenizer
    # <image> and <pad> were added and the embeddings resized to match.
    assert tok.pad_token == "<pad>" and model.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == model.config.text_config.vocab_size
    assert processor.patch_size == 8 and processor.num_additional_image_tokens == 1
    assert num_image_tokens(model.config) == 16 == model.config.image_seq_length
    # The vision tower is the CLIP checkpoint's vision half, bit for bit.
    clip = CLIPModel.from_pretrained(clip_dir)
    tower = model.model.vision_tower.state_dict()
    assert tower.keys() == clip.vision_model.state_dict().keys()
    for k, v in clip.vision_model.state_dict().items():
        assert torch.equal(tower[k], v), k
    llm = LlamaForCausalLM.from_pretrained(llm_dir)
    assert torch.equal(model.lm_head.weight[: llm.lm_head.weight.shape[0]], llm.lm_head.weight)
    # The processor's <image> expansion matches the features: a pixel forward works.
    from PIL import Image

    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour"}]}],
                                           add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (40, 30), (255, 0, 0)), text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16
    assert model(**inputs).logits.shape[-1] == len(tok)


@pytest.mark.s3
def test_compose_and_load_from_s3(tmp_path, s3_env):
    clip_dir, llm_dir = save_components(tmp_path)
    bucket = s3_env.new_bucket()
    storage.upload_dir(clip_dir, f"s3://{bucket}/clip")
    storage.upload_dir(llm_dir, f"s3://{bucket}/vicuna")
    spec = ModelSpec(vision_tower=f"s3://{bucket}/clip", llm=f"s3://{bucket}/vicuna")
    model, processor = build_model(spec)
    save_model(model, processor, f"s3://{bucket}/llava-init")
    again, proc2 = build_model(ModelSpec(checkpoint=f"s3://{bucket}/llava-init"))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert proc2.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_image_size_must_be_a_multiple_of_patch_size(tmp_path):
    clip_dir, llm_dir = save_components(tmp_path, image_size=30, patch_size=8)
    with pytest.raises(ModelBuildError, match="image_size 30 is not a multiple of its patch_size 8"):
        compose(ModelSpec(vision_tower=str(clip_dir), llm=str(llm_dir)))


def test_tokenizer_without_eos(tmp_path):
    clip_dir, llm_dir = save_components(tmp_path, eos=False)
    with pytest.raises(ModelBuildError, match="no end-of-sequence token"):
        compose(ModelSpec(vision_tower=str(clip_dir), llm=str(llm_dir)))


def test_missing_components_are_clear(tmp_path):
    clip_dir, llm_dir = save_components(tmp_path)
    with pytest.raises(ModelBuildError, match="cannot load a CLIP vision tower from"):
        compose(ModelSpec(vision_tower=str(tmp_path / "nope"), llm=str(llm_dir)))
    with pytest.raises(ModelBuildError, match="cannot load a causal language model from"):
        compose(ModelSpec(vision_tower=str(clip_dir), llm=str(tmp_path / "nope")))
    with pytest.raises(ModelBuildError, match="cannot load a LLaVA checkpoint from"):
        load_checkpoint(str(tmp_path / "nope"))


def test_vision_feature_layer_out_of_range(tmp_path):
    clip_dir, llm_dir = save_components(tmp_path)
    with pytest.raises(ModelBuildError, match="vision_feature_layer -9 is outside"):
        compose(ModelSpec(vision_tower=str(clip_dir), llm=str(llm_dir), vision_feature_layer=-9))


RELOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    path, image = sys.argv[1], sys.argv[2]
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    print(json.dumps(out[0].tolist()))
    """
)


def generate_tokens(model, processor, image_path):
    from PIL import Image

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    return model.generate(**inputs, max_new_tokens=12, do_sample=False)[0].tolist()


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_saved_model_reloads_in_plain_transformers_in_another_process(tmp_path, synth_dir, preset):
    model, processor = build_preset(preset, seed=2)
    model.eval()
    image = next((synth_dir / "images").iterdir())
    expected = generate_tokens(model, processor, image)
    save_model(model, processor, str(tmp_path / "m"))
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    # A fresh interpreter that imports only transformers, not llava_platform.
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "m"), str(image)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected



def test_processor_from_mlflow_uris_downloads_no_weights(tmp_path, monkeypatch):
    """The Gateway loads only the processor and config; from ``runs:/`` and ``models:/`` URIs it
    downloaded the whole export before (weights included: 14 GB for a 7B model)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from llava_platform.model.builder import load_processor
    from llava_platform.tracking.models import resolve_model_uri

    model, processor = build_preset("tiny")
    export = tmp_path / "export"
    save_model(model, processor, str(export))
    assert (export / "model.safetensors").exists()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(export), "export")
    MlflowClient(uri).create_registered_model("tiny-llava")
    MlflowClient(uri).create_model_version("tiny-llava", f"runs:/{run.info.run_id}/export", run.info.run_id)

    for source in (f"runs:/{run.info.run_id}", "models:/tiny-llava/1"):
        got = load_processor(ModelSpec(checkpoint=source))[1]
        assert got.to_dict() == model.config.to_dict()
        local = resolve_model_uri(source, weights=False)
        names = {p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file()}
        expected = {p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()}
        assert names == expected - {"model.safetensors"}, source
    assert (Path(resolve_model_uri(f"runs:/{run.info.run_id}")) / "model.safetensors").exists()
