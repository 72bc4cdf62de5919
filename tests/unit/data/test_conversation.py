"""Loss masks from the chat templates, checked against hand-written expectations.

Each expectation is written as text: the whole rendered prompt, and the exact text that carries loss.
Token-level checks then assert that the labels are -100 everywhere except those tokens.
"""

import pytest

from llava_platform.data.conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    chat_template,
    llava_turns_to_messages,
    tokenize_messages,
    tokenize_record,
)
from llava_platform.errors import RecordError, TemplateError

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,"
    " detailed, and polite answers to the human's questions."
)
N_IMG = 4  # image tokens per image in these tests


def h(v):
    return {"from": "human", "value": v}


def g(v):
    return {"from": "gpt", "value": v}


def supervised_text(tok, sample):
    """The text of the labelled tokens, with a '|' between separate labelled spans."""
    spans, cur = [], []
    for i, lab in zip(sample.input_ids, sample.labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return "|".join(tok.decode(s) for s in spans)


def full_text(tok, sample):
    return tok.decode(sample.input_ids)


def image_run(tok, sample):
    """(start, length) of the <image> run."""
    img = tok.convert_tokens_to_ids("<image>")
    idx = [k for k, t in enumerate(sample.input_ids) if t == img]
    return (idx[0], len(idx)) if idx else (None, 0)


def test_plain_masks_only_caption_and_separator(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"id": "1", "image": "x.png", "conversations": [h("<image>\nDescribe the image concisely."), g("A red circle.")]}
    s = tokenize_record(rec, tok, "plain", N_IMG, 512)
    assert full_text(tok, s) == "<s>" + "<image>" * N_IMG + "A red circle.\n"
    assert supervised_text(tok, s) == "A red circle.\n"
    assert s.labels[: 1 + N_IMG] == [IGNORE_INDEX] * (1 + N_IMG)
    assert image_run(tok, s) == (1, N_IMG)


def test_llava_v1_single_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"id": "1", "image": "x.png", "conversations": [h("<image>\nWhat colour is the circle?"), g("red")]}
    s = tokenize_record(rec, tok, "llava_v1", N_IMG, 512)
    assert full_text(tok, s) == (
        f"<s>{SYSTEM} USER: " + "<image>" * N_IMG + "\nWhat colour is the circle? ASSISTANT: red</s>"
    )
    assert supervised_text(tok, s) == " red</s>"
    assert s.input_ids[-1] == tok.eos_token_id and s.labels[-1] == tok.eos_token_id


def test_image_at_end_of_turn_is_moved_to_start(tiny_tokenizer):
    tok = tiny_tokenizer
    start = {"id": "a", "image": "x.png", "conversations": [h("<image>\nHow many shapes?"), g("2")]}
    end = {"id": "b", "image": "x.png", "conversations": [h("How many shapes?\n<image>"), g("2")]}
    a = tokenize_record(start, tok, "llava_v1", N_IMG, 512)
    b = tokenize_record(end, tok, "llava_v1", N_IMG, 512)
    assert a.input_ids == b.input_ids and a.labels == b.labels


def test_llava_v1_multi_turn_masks_each_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"id": "1", "image": "x.png", "conversations": [
        h("<image>\nWhat shape is it?"), g("A star."), h("And its colour?"), g("It is blue.")]}
    s = tokenize_record(rec, tok, "llava_v1", N_IMG, 512)
    assert full_text(tok, s) == (
        f"<s>{SYSTEM} USER: " + "<image>" * N_IMG
        + "\nWhat shape is it? ASSISTANT: A star.</s>USER: And its colour? ASSISTANT: It is blue.</s>"
    )
    assert supervised_text(tok, s) == " A star.</s>| It is blue.</s>"


def test_text_only_sample(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"id": "t", "conversations": [h("How many corners does a triangle have?"), g("Three.")]}
    s = tokenize_record(rec, tok, "llava_v1", N_IMG, 512)
    assert image_run(tok, s) == (None, 0)
    assert full_text(tok, s) == f"<s>{SYSTEM} USER: How many corners does a triangle have? ASSISTANT: Three.</s>"
    assert supervised_text(tok, s) == " Three.</s>"


def test_system_turn_replaces_default_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"id": "s", "conversations": [{"from": "system", "value": "Be brief."}, h("Hi"), g("Hello.")]}
    s = tokenize_record(rec, tok, "llava_v1", N_IMG, 512)
    assert full_text(tok, s) == "<s>Be brief. USER: Hi ASSISTANT: Hello.</s>"
    assert supervised_text(tok, s) == " Hello.</s>"


def test_truncation_keeps_image_and_cuts_the_end(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"id": "1", "image": "x.png", "conversations": [
        h("<image>\nWhat shape is it?"), g("A star."), h("And its colour?"), g("It is blue, a deep and bright blue.")]}
    full = tokenize_record(rec, tok, "llava_v1", N_IMG, 4096)
    cut_at = full.length - 3
    s = tokenize_record(rec, tok, "llava_v1", N_IMG, cut_at)
    assert s.length == cut_at
    assert s.input_ids == full.input_ids[:cut_at] and s.labels == full.labels[:cut_at]
    assert image_run(tok, s) == image_run(tok, full)


def test_truncation_never_cuts_through_image_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"id": "1", "image": "x.png", "conversations": [h("<image>\nWhat shape is it?"), g("A star.")]}
    start, n = image_run(tok, tokenize_record(rec, tok, "llava_v1", 64, 4096))
    with pytest.raises(RecordError) as e:
        tokenize_record(rec, tok, "llava_v1", 64, start + n - 1)
    assert e.value.reason == "too_long"


def test_truncation_that_leaves_no_answer_is_too_long(tiny_tokenizer):
    tok = tiny_tokenizer
    rec = {"id": "1", "image": "x.png", "conversations": [h("<image>\nWhat shape is it?"), g("A star.")]}
    start, n = image_run(tok, tokenize_record(rec, tok, "llava_v1", N_IMG, 4096))
    with pytest.raises(RecordError, match="no assistant token") as e:
        tokenize_record(rec, tok, "llava_v1", N_IMG, start + n + 2)
    assert e.value.reason == "too_long"


@pytest.mark.parametrize(
    "conversations, has_image, reason",
    [
        ([], False, "empty_conversation"),
        (None, False, "empty_conversation"),
        ([g("hi"), h("x")], False, "first_turn_not_human"),
        ([h("only a question")], False, "no_assistant_turn"),
        ([h("q"), g(3)], False, "non_string_text"),
        ([h("q"), {"from": "robot", "value": "x"}], False, "unknown_role"),
        ([h("q"), {"value": "x"}], False, "malformed_turn"),
        ([h("q"), h("q2"), g("a")], False, "roles_not_alternating"),
        ([h("no placeholder"), g("a")], True, "image_without_placeholder"),
        ([h("<image>\n<image> two"), g("a")], True, "multiple_image_placeholders"),
        ([h("<image>\nq"), g("a")], False, "placeholder_without_image"),
        ([h("q"), g("<image> in an answer")], True, "placeholder_not_in_human_turn"),
    ],
)
def test_invalid_conversations_have_a_reason(conversations, has_image, reason):
    with pytest.raises(RecordError) as e:
        llava_turns_to_messages(conversations, has_image)
    assert e.value.reason == reason


@pytest.mark.parametrize("conversations, has_image, messages, fixes", [
    # preprocess_v1: "Skip the first one if it is not from human".
    ([g("hello"), h("hi"), g("hey")], False, [("user", "hi"), ("assistant", "hey")], ["dropped_leading_gpt_turn"]),
    # preprocess_multimodal: every <image> in a turn removed, one put in front.
    ([h("<image>\n<image> two"), g("a")], True, [("user", "<image>\ntwo"), ("assistant", "a")],
     ["image_placeholders_collapsed"]),
    ([h("no placeholder"), g("a")], True, [("user", "<image>\nno placeholder"), ("assistant", "a")],
     ["image_placeholder_added"]),
    ([{"from": "system", "value": "s"}, g("x"), h("q"), g("a")], True,
     [("system", "s"), ("user", "<image>\nq"), ("assistant", "a")], ["dropped_leading_gpt_turn", "image_placeholder_added"]),
    ([h("<image>\nq"), g("a")], True, [("user", "<image>\nq"), ("assistant", "a")], []),
])
def test_record_policy_llava_normalises_what_llava_trains_on(conversations, has_image, messages, fixes):
    got: list[str] = []
    out = llava_turns_to_messages(conversations, has_image, "llava", got)
    assert [(m["role"], m["content"]) for m in out] == messages and got == fixes


@pytest.mark.parametrize("conversations, has_image, reason", [
    ([g("hello"), h("hi")], False, "no_assistant_turn"),  # nothing left to learn from once the gpt turn goes
    ([h("<image>\nq"), g("a"), h("<image>\nmore"), g("b")], True, "multiple_image_placeholders"),  # two turns
    ([h("<image>\nq"), g("a")], False, "placeholder_without_image"),
])
def test_record_policy_llava_still_rejects_what_llava_cannot_train_on(conversations, has_image, reason):
    with pytest.raises(RecordError) as e:
        llava_turns_to_messages(conversations, has_image, "llava")
    assert e.value.reason == reason


def test_unknown_template():
    with pytest.raises(TemplateError, match="unknown conversation template 'vicuna_v0'.*plain, vicuna_v1, llava_v1"):
        chat_template("vicuna_v0")


def test_tokenizer_without_eos(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = None
    with pytest.raises(TemplateError, match="no end-of-sequence token"):
        tokenize_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                          tok, "llava_v1", N_IMG, 64)


def test_template_rejects_unknown_role_in_messages(tiny_tokenizer):
    with pytest.raises(TemplateError, match="unknown role tool"):
        tokenize_messages([{"role": "user", "content": "q"}, {"role": "tool", "content": "a"}],
                          tiny_tokenizer, "llava_v1", N_IMG, 64)


def test_vicuna_v1_is_llava_15s_template_and_differs_from_llava_v1_only_in_the_system_message(tiny_tokenizer):
    # LLaVA's conversation.py: conv_vicuna_v1 (conv_templates["v1"], what LLaVA-1.5's --version v1
    # and --conv-mode vicuna_v1 use) says "curious user ... the user's questions"; conv_llava_v1 says
    # "human". Both: SeparatorStyle.TWO, roles USER/ASSISTANT, sep " ", sep2 "</s>".
    vicuna = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,"
              " detailed, and polite answers to the user's questions.")
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "Colour?"}]
    for name, system in (("vicuna_v1", vicuna), ("llava_v1", SYSTEM)):
        text = tiny_tokenizer.apply_chat_template(messages, chat_template=chat_template(name), tokenize=False,
                                                  add_generation_prompt=True)
        assert text == f"<s>{system} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Colour? ASSISTANT:"
    with pytest.raises(TemplateError, match="unknown role tool: vicuna_v1 takes"):
        tokenize_messages([{"role": "user", "content": "q"}, {"role": "tool", "content": "a"}],
                          tiny_tokenizer, "vicuna_v1", N_IMG, 64)


def test_content_parts_render_like_placeholders(tiny_tokenizer):
    tok = tiny_tokenizer
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = [{"role": "user", "content": "<image>\nWhat is it?"}]
    src = chat_template("llava_v1")
    a = tok.apply_chat_template(parts, chat_template=src, tokenize=False, add_generation_prompt=True)
    b = tok.apply_chat_template(text, chat_template=src, tokenize=False, add_generation_prompt=True)
    assert a == b == f"<s>{SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"


def _llama_style_tokenizer(legacy: bool):
    """A Llama-style tokenizer built here (BPE over Metaspace pieces, byte fallback, <s> </s> <unk>),
    in transformers' LlamaTokenizer with its `legacy` flag: the way vicuna's tokenizer behaves."""
    import json as _json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    sp = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    corpus = ["A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.", "a red circle on the left",
              "What colour is the shape? USER: ASSISTANT: Red."] * 20
    sp.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    model = _json.loads(sp.to_str())["model"]
    vocab = model["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER], "pad_token": "<unk>"})
    return tok


def test_llama_tokenizers_give_llavas_ids_in_both_legacy_modes():
    # LLaVA's tokenizer_image_token: the prompt split at <image>, each piece tokenized on its own
    # (BOS as an id), so the system text starts with "▁A", stage 1's caption with "▁a", and a "▁"
    # stays after the image. Measured before: with legacy=False (transformers 5's default) the whole
    # rendered string gave 'A' and 'a' and lost that "▁".
    from llava_platform.data.conversation import chat_ids

    vicuna = [{"role": "user", "content": "<image>\nWhat colour is the shape?"}, {"role": "assistant", "content": "Red."}]
    plain = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a red circle on the left"}]
    got = {}
    for legacy in (True, False):
        tok = _llama_style_tokenizer(legacy)
        for name, messages in (("vicuna_v1", vicuna), ("plain", plain)):
            ids, mask = chat_ids(tok, messages, chat_template(name))
            got[legacy, name] = ids, mask
            pieces = tok.convert_ids_to_tokens(ids)
            image = pieces.index(IMAGE_PLACEHOLDER)
            if name == "vicuna_v1":
                assert pieces[:2] == ["<s>", "\u2581A"] and pieces[image + 1:image + 3] == ["\u2581", "<0x0A>"]
                assert tok.decode([i for i, m in zip(ids, mask) if m]).strip() == "Red.</s>"
            else:
                assert pieces[image + 1] == "\u2581a" and mask[image + 1] == 1 and mask[image] == 0
        whole = tok.apply_chat_template(vicuna, chat_template=chat_template("vicuna_v1"), tokenize=True,
                                        return_dict=True)["input_ids"]
        assert (tok.convert_ids_to_tokens(whole)[1] == "\u2581A") is legacy  # what HF's own path gives
    assert got[True, "vicuna_v1"] == got[False, "vicuna_v1"] and got[True, "plain"] == got[False, "plain"]
    # Several turns: LLaVA-1.5 trained with a legacy (slow SentencePiece) tokenizer, in which the text
    # after </s> starts a word too ("▁USER"); both modes give those ids, and so does serving's prompt.
    turns = [*vicuna, {"role": "user", "content": "And the shape?"}, {"role": "assistant", "content": "A circle."}]
    legacy, modern = _llama_style_tokenizer(True), _llama_style_tokenizer(False)
    src = chat_template("vicuna_v1")
    reference = legacy.apply_chat_template(turns, chat_template=src, tokenize=True, return_dict=True)["input_ids"]
    assert chat_ids(legacy, turns, src)[0] == chat_ids(modern, turns, src)[0] == list(reference)
    pieces = modern.convert_ids_to_tokens(chat_ids(modern, turns, src)[0])
    assert pieces[pieces.index("</s>") + 1].startswith("\u2581")
    prompt, _ = chat_ids(modern, turns[:3], src, add_generation_prompt=True, with_mask=False)
    assert prompt == chat_ids(legacy, turns[:3], src, add_generation_prompt=True)[0]
    sample = tokenize_record({"id": "1", "image": "x.png", "conversations": [h("<image>\nWhat colour is the shape?"),
                                                                            g("Red.")]},
                             _llama_style_tokenizer(False), "vicuna_v1", N_IMG, 512)
    assert sample.input_ids.count(_llama_style_tokenizer(False).convert_tokens_to_ids(IMAGE_PLACEHOLDER)) == N_IMG
