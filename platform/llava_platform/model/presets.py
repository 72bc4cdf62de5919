"""The ``tiny`` and ``small`` presets: LLaVAs built from config (random init) with a byte-level BPE
tokenizer trained locally on the synthetic world. Tests use them; they take exactly the assembly, save
and load path of a 7B model (:mod:`llava_platform.model.assembly`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration, LlavaProcessor

from llava_platform.config.components import LanguageModelSpec
from llava_platform.config.schema import ModelSpec
from llava_platform.data import synthetic
from llava_platform.errors import ModelBuildError
from llava_platform.model.assembly import assemble
from llava_platform.model.components import build_language_model, default_image_processor
from llava_platform.model.tokenizer import train_bpe_tokenizer

@dataclass(frozen=True)
class Preset:
    """Sizes of a preset model. ``image_size`` / ``patch_size`` fix the number of image tokens."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    vocab_size: int
    corpus_scenes: int


PRESETS: dict[str, Preset] = {
    # Tests: builds in about a second; 16 image tokens.
    "tiny": Preset(32, 8, 32, 2, 2, 64, 2, 4, 512, 200),
    # Demo: a few million parameters; 64 image tokens, enough resolution for a 3x3 layout of shapes.
    "small": Preset(64, 8, 128, 4, 4, 256, 4, 4, 2048, 2000),
}


def build_preset(
    name: str,
    seed: int = 0,
    projector_type: str = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: str = "default",
    image_size: int | None = None,
    patch_size: int | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised preset model with a tokenizer trained on the synthetic corpus.

    ``image_size``/``patch_size`` override the preset's (benchmarks use 336/14, CLIP ViT-L/14-336's
    geometry, so that image work and token counts match a real LLaVA-1.5 run).

    Raises:
        ModelBuildError: unknown preset name.
    """
    if name not in PRESETS:
        raise ModelBuildError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    if image_size or patch_size:
        p = replace(p, image_size=image_size or p.image_size, patch_size=patch_size or p.patch_size)
    tokenizer = train_bpe_tokenizer(synthetic.corpus(seed=seed, n_scenes=p.corpus_scenes), p.vocab_size)
    vision_cfg = CLIPVisionConfig(
        hidden_size=p.vision_hidden,
        intermediate_size=4 * p.vision_hidden,
        num_hidden_layers=p.vision_layers,
        num_attention_heads=p.vision_heads,
        image_size=p.image_size,
        patch_size=p.patch_size,
        projection_dim=p.vision_hidden,
    )
    lm_spec = LanguageModelSpec(hidden_size=p.text_hidden, layers=p.text_layers, heads=p.text_heads,
                                vocab_size=p.vocab_size)
    torch.manual_seed(seed)
    vision = CLIPVisionModel(vision_cfg)
    llm = build_language_model(lm_spec, tokenizer)
    image_processor = default_image_processor(p.image_size)
    spec = ModelSpec(preset=name, seed=seed, projector_type=projector_type,  # type: ignore[arg-type]
                     vision_feature_layer=vision_feature_layer,
                     vision_feature_select_strategy=vision_feature_select_strategy)  # type: ignore[arg-type]
    return assemble(vision, llm, tokenizer, image_processor, spec)
