"""Stage 0 of the embedded default: the configs of the pretrained parts LLaVA composes, made on the
synthetic world (a CLIP-style vision tower and a small Llama; ``jobs/pretrain_components.py``)."""

from __future__ import annotations

from pydantic import Field, model_validator

from llava_platform.config.schema import ComponentStage, StorageConfig, StrictModel, TrackingConfig, TrainConfig


def _heads_divide_width(spec):
    if spec.hidden_size % spec.heads:
        raise ValueError(f"hidden_size {spec.hidden_size} is not a multiple of heads {spec.heads}")
    return spec


class VisionTowerSpec(StrictModel):
    """A CLIP-style vision tower made on the synthetic world: ``transformers.CLIPModel`` (vision + text
    towers) with its contrastive loss on image-caption pairs, plus a dense objective on the patch
    features that LLaVA takes (``feature_layer``): each patch names what its grid cell holds (kind and
    colour, jointly, so the features must bind them) and where it is. Contrastive captions alone are bag
    of words and do not teach binding (CLIP is known to be weak there)."""

    # 96 px in patches of 32: one image token per cell of the world's 3x3 grid (9 tokens).
    image_size: int = Field(96, gt=0)
    patch_size: int = Field(32, gt=0)
    hidden_size: int = Field(128, gt=0)
    layers: int = Field(4, gt=0)
    heads: int = Field(4, gt=0)
    # The CLIP text tower, used only for the contrastive loss and dropped from the export.
    text_hidden_size: int = Field(128, gt=0)
    text_layers: int = Field(2, gt=0)
    projection_dim: int = Field(128, gt=0)
    # The hidden state the dense objective reads: the one LLaVA's `vision_feature_layer` takes.
    feature_layer: int = -2
    contrastive_weight: float = Field(1.0, ge=0)
    cell_weight: float = Field(1.0, ge=0)
    position_weight: float = Field(0.5, ge=0)
    # Patches that hold a shape weigh this much more than empty ones in the cell loss.
    object_weight: float = Field(5.0, gt=0)
    max_caption_tokens: int = Field(64, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "VisionTowerSpec":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        _heads_divide_width(self)
        if not -self.layers - 1 <= self.feature_layer <= self.layers:
            raise ValueError(f"feature_layer {self.feature_layer} is outside the tower's {self.layers} layers")
        return self


class LanguageModelSpec(StrictModel):
    """A small ``LlamaForCausalLM`` with a byte-level BPE tokenizer, trained on the world's text."""

    hidden_size: int = Field(128, gt=0)
    layers: int = Field(4, gt=0)
    heads: int = Field(4, gt=0)
    vocab_size: int = Field(2048, gt=300)
    max_position_embeddings: int = Field(2048, gt=0)
    tie_word_embeddings: bool = False

    _check = model_validator(mode="after")(_heads_divide_width)


class ComponentRunConfig(StrictModel):
    """One stage-0 training run as its workers see it."""

    name: str
    component: ComponentStage
    vision_tower: VisionTowerSpec = VisionTowerSpec()
    language_model: LanguageModelSpec = LanguageModelSpec()
    train: TrainConfig
    seed: int = 0


class ComponentsJobConfig(StrictModel):
    """`jobs/pretrain_components.py`: the pretrained parts of the embedded default, made on a synthetic
    world (``llava-platform data synth``) with Ray Train + DeepSpeed, then composed into a LLaVA exactly
    as CLIP ViT-L/14-336 + Vicuna-7B are (``model build --vision-tower DIR --llm DIR``)."""

    # Prefix of the two runs' names (<name>-vision-tower, <name>-language-model).
    name: str = "components"
    # A synthetic world written by `llava-platform data synth` (images/, scenes.jsonl, *.json).
    world: str
    # vision_tower/ and language_model/ (plain HF directories) are written here.
    output_path: str
    # Ray Train checkpoints of both runs.
    storage_path: str
    vision_tower: VisionTowerSpec = VisionTowerSpec()
    language_model: LanguageModelSpec = LanguageModelSpec()
    # The two runs' training settings (their `stage` is set here: vision_tower, language_model).
    vision_tower_train: TrainConfig
    language_model_train: TrainConfig
    seed: int = 0
    # Keep a component whose output was made from the same world and settings (its fingerprint
    # matches) instead of training it again.
    reuse: bool = True
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="before")
    @classmethod
    def _stages(cls, data):
        if isinstance(data, dict):
            for key, stage in (("vision_tower_train", "vision_tower"), ("language_model_train", "language_model")):
                section = data.get(key)
                if isinstance(section, dict):
                    if section.get("stage", stage) != stage:
                        raise ValueError(f"{key}.stage must be {stage} (or left out)")
                    data = {**data, key: {**section, "stage": stage}}
        return data

    @model_validator(mode="after")
    def _tower_batches(self) -> "ComponentsJobConfig":
        # The tower's rows are images of one size with no `length`: there is nothing to group by (the
        # worker would fail on the missing column after Ray had started).
        if self.vision_tower_train.group_by_modality_length:
            raise ValueError("vision_tower_train.group_by_modality_length: the vision tower's rows are images of "
                             "one size with no length to group by; leave it false (it applies to language_model_train)")
        return self
