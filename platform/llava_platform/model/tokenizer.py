"""A byte-level BPE tokenizer trained locally with ``tokenizers``, saved in HF format.

Real runs use the LLM's own tokenizer (vicuna's); the presets need one without a hub, so we train a
small one on the synthetic world's text plus varied sentences (a corpus of template sentences alone
gives a vocabulary too narrow to be a fair stand-in). Byte-level BPE covers every byte, so any text
tokenizes, including text the corpus never saw.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llava_platform.errors import ModelBuildError

BOS, EOS, UNK, PAD, IMAGE = "<s>", "</s>", "<unk>", "<pad>", "<image>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IMAGE]


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with LLaVA's special tokens (``<s> </s> <unk> <pad> <image>``)."""
    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ModelBuildError(f"vocab_size {vocab_size} leaves no room for merges beyond the 256 bytes")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Offsets must cover the leading space of a token for assistant-mask alignment.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=4096,
        padding_side="right",
    )
