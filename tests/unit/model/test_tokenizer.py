import pytest

from llava_platform.errors import ModelBuildError
from llava_platform.model.tokenizer import SPECIAL_TOKENS, train_bpe_tokenizer

CORPUS = ["a red circle at the top left", "What colour is the square?", "The quick brown fox."] * 20


def test_special_tokens_and_roundtrip(tmp_path):
    tok = train_bpe_tokenizer(CORPUS, 300)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.image_token) == ("<s>", "</s>", "<pad>", "<image>")
    text = "Unseen text: naïve café 東京 🙂 <image> end"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<image>") in ids
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(text, add_special_tokens=False) == ids and again.image_token == "<image>"


def test_vocab_too_small():
    with pytest.raises(ModelBuildError, match="no room for merges"):
        train_bpe_tokenizer(CORPUS, 200)
