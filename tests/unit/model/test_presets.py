"""The tiny and small presets: their sizes, and the same model and tokenizer from the same seed."""

import pytest
import torch

from llava_platform.errors import ModelBuildError
from llava_platform.model.builder import describe
from llava_platform.model.presets import build_preset


def test_unknown_preset():
    with pytest.raises(ModelBuildError, match="unknown model preset 'huge'"):
        build_preset("huge")


def test_presets_sizes():
    tiny, _ = build_preset("tiny")
    small, _ = build_preset("small")
    assert sum(describe(tiny)["params"].values()) < 500_000
    assert 2_000_000 < sum(describe(small)["params"].values()) < 10_000_000
    assert describe(small)["image_tokens"] == 64


def test_preset_is_deterministic():
    a, pa = build_preset("tiny", seed=1)
    b, pb = build_preset("tiny", seed=1)
    assert pa.tokenizer.get_vocab() == pb.tokenizer.get_vocab()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
