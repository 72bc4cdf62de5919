"""The embedded default's pretrained parts, as models: a CLIP-style vision tower and a small causal LM.

LLaVA composes a pretrained CLIP tower and a pretrained LLM. Without a model hub, stage 0 makes small
ones on the synthetic world (``train/components.py`` runs it); this module builds their architectures
and writes them as the plain HF directories ``compose`` loads: a ``CLIPVisionModel`` with its image
processor, a ``LlamaForCausalLM`` with its tokenizer, the same kinds of directory as
``openai/clip-vit-large-patch14-336`` and ``lmsys/vicuna-7b-v1.5``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.utils import ModelOutput

from llava_platform.config.components import LanguageModelSpec, VisionTowerSpec
from llava_platform.data.images import CLIP_MEAN, CLIP_STD

@dataclass
class VisionPretrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    cell_loss: torch.Tensor | None = None
    position_loss: torch.Tensor | None = None


class VisionPretrainingModel(torch.nn.Module):
    """``CLIPModel`` plus two linear heads on the patch features of ``spec.feature_layer``.

    - contrastive: CLIP's own image-caption loss;
    - cell: each patch classifies what its grid cell holds, kind and colour jointly (an object must be
      seen whole: which colour belongs to which kind), empty patches weighing less;
    - position: each patch names its own index, which keeps where-it-is in the features LLaVA reads.
    The heads are dropped from the export; only the vision half leaves this module.
    """

    def __init__(self, spec: VisionTowerSpec, vocab_size: int, eos_token_id: int, num_cell_classes: int):
        super().__init__()
        self.spec = spec
        vision = CLIPVisionConfig(hidden_size=spec.hidden_size, intermediate_size=4 * spec.hidden_size,
                                  num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                                  image_size=spec.image_size, patch_size=spec.patch_size,
                                  projection_dim=spec.projection_dim)
        text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=spec.text_hidden_size,
                              intermediate_size=4 * spec.text_hidden_size, num_hidden_layers=spec.text_layers,
                              num_attention_heads=max(1, spec.text_hidden_size // 32),
                              max_position_embeddings=spec.max_caption_tokens, projection_dim=spec.projection_dim,
                              # the tokenizer's own ids (CLIP's defaults name its 49408-token vocabulary);
                              # the caption's embedding is read at its end-of-sequence token
                              bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=None)
        self.clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                         projection_dim=spec.projection_dim))
        # CLIP's temperature is a 0-d parameter, which DeepSpeed's initial broadcast cannot view as
        # bytes; a 1-element one is the same number and broadcasts the same way in CLIP's logits.
        self.clip.logit_scale = torch.nn.Parameter(self.clip.logit_scale.detach().reshape(1))
        self.cell_head = torch.nn.Linear(spec.hidden_size, num_cell_classes)
        patches = (spec.image_size // spec.patch_size) ** 2
        self.position_head = torch.nn.Linear(spec.hidden_size, patches)
        if spec.contrastive_weight == 0:
            # No contrastive term: what only it trains stays as built (the text tower, the projections, and
            # the vision layers above the feature layer, which LLaVA does not read), so that no trainable
            # parameter goes without a gradient.
            vision = self.clip.vision_model
            first_unused = spec.feature_layer % (spec.layers + 1)  # hidden_states[i] is layer i-1's output
            for module in (self.clip.text_model, self.clip.text_projection, self.clip.visual_projection,
                           vision.post_layernorm, *vision.encoder.layers[first_unused:]):
                module.requires_grad_(False)
            self.clip.logit_scale.requires_grad_(False)

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The features LLaVA takes: hidden state ``feature_layer``, CLS token dropped. Only the layers
        up to it run (the tower's last layer is a quarter of its work at the default's 4 layers, and
        nothing reads it without the contrastive term)."""
        vision = self.clip.vision_model
        hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))  # hidden_states[0]
        for layer in vision.encoder.layers[: self.spec.feature_layer % (self.spec.layers + 1)]:
            hidden = layer(hidden, None)
        return hidden[:, 1:]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cell_targets: torch.Tensor, **_: Any) -> VisionPretrainingOutput:
        spec = self.spec
        contrastive = None
        if spec.contrastive_weight > 0:
            out = self.clip(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            return_loss=True, output_hidden_states=True)
            feats = out.vision_model_output.hidden_states[spec.feature_layer][:, 1:]
            contrastive = out.loss
        else:  # the dense objective alone: the text tower is not run (nor trained, see __init__)
            feats = self.patch_features(pixel_values)
        n, patches, _ = feats.shape
        weight = torch.where(cell_targets > 0, spec.object_weight, 1.0).to(feats.dtype)
        per_patch = torch.nn.functional.cross_entropy(self.cell_head(feats).flatten(0, 1), cell_targets.flatten(),
                                                      reduction="none")
        cell = (per_patch * weight.flatten()).sum() / weight.sum()
        where = torch.arange(patches, device=feats.device).repeat(n)
        position = torch.nn.functional.cross_entropy(self.position_head(feats).flatten(0, 1), where)
        loss = spec.cell_weight * cell + spec.position_weight * position
        if contrastive is not None:
            loss = loss + spec.contrastive_weight * contrastive
            contrastive = contrastive.detach()
        return VisionPretrainingOutput(loss=loss, contrastive_loss=contrastive, cell_loss=cell.detach(),
                                       position_loss=position.detach())


def build_vision_pretraining_model(spec: VisionTowerSpec, vocab_size: int, eos_token_id: int,
                                   num_cell_classes: int) -> VisionPretrainingModel:
    """A randomly initialised tower to pretrain, for a tokenizer of ``vocab_size`` whose captions end
    with ``eos_token_id``."""
    return VisionPretrainingModel(spec, vocab_size, eos_token_id, num_cell_classes)


def vision_tower_of(model: VisionPretrainingModel) -> CLIPVisionModel:
    """The vision half as a stand-alone ``CLIPVisionModel`` (same weights)."""
    tower = CLIPVisionModel(model.clip.config.vision_config)
    tower.load_state_dict(model.clip.vision_model.state_dict())
    return tower


def save_vision_tower(model: VisionPretrainingModel, spec: VisionTowerSpec, out_dir: str) -> None:
    """``CLIPVisionModel`` + ``CLIPImageProcessor`` config: what ``compose`` reads from a CLIP directory."""
    vision_tower_of(model).save_pretrained(out_dir)
    default_image_processor(spec.image_size).save_pretrained(out_dir)


def build_language_model(spec: LanguageModelSpec, tokenizer: Any) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` sized by ``spec`` for ``tokenizer``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=int(spec.hidden_size * 8 / 3),
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    return LlamaForCausalLM(config)


def default_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """CLIP's preprocessing at ``image_size`` (resize shortest edge, centre crop, CLIP mean/std)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
