"""Conversation templates and the tokenization of LLaVA records into ``input_ids`` + ``labels``.

Templates are HF chat templates (``data/templates/*.jinja``) whose assistant parts sit inside
``{% generation %}``; the loss mask comes from
``tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)``, not from hand-computed
offsets. The one ``<image>`` token is then expanded to the number of image features the vision tower
produces, so that ``LlavaForConditionalGeneration`` finds one placeholder per feature.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal, Sequence, get_args

from llava_platform.config.schema import TemplateName
from llava_platform.errors import RecordError, TemplateError

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
TEMPLATE_NAMES = get_args(TemplateName)
#: The default system messages of LLaVA's conv_vicuna_v1 (LLaVA-1.5 trains and evaluates with it:
#: ``--version v1``, ``--conv-mode vicuna_v1``) and conv_llava_v1; both render with ``templates/v1.jinja``.
V1_SYSTEM_MESSAGES = {
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.",
}
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@cache
def chat_template(name: str) -> str:
    """The Jinja source of a named conversation template.

    Raises:
        TemplateError: unknown template name.
    """
    if name not in TEMPLATE_NAMES:
        raise TemplateError(f"unknown conversation template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
    folder = resources.files("llava_platform.data").joinpath("templates")
    if name in V1_SYSTEM_MESSAGES:
        source = folder.joinpath("v1.jinja").read_text(encoding="utf-8")
        return source.replace("__DEFAULT_SYSTEM__", V1_SYSTEM_MESSAGES[name]).replace("__NAME__", name)
    return folder.joinpath(f"{name}.jinja").read_text(encoding="utf-8")


#: ``llava``: normalise what LLaVA's training code accepts (see :func:`llava_turns_to_messages`);
#: ``strict``: reject those records instead.
RecordPolicy = Literal["llava", "strict"]
#: The normalisations of ``record_policy: llava``, by the name the manifest counts them under.
NORMALISATIONS = ("dropped_leading_gpt_turn", "image_placeholder_added", "image_placeholders_collapsed")


def llava_turns_to_messages(conversations: Any, has_image: bool, policy: RecordPolicy = "strict",
                            normalised: list[str] | None = None) -> list[dict[str, str]]:
    """Validate LLaVA turns (``{"from": "human"|"gpt", "value": str}``) and convert them to chat messages.

    The ``<image>`` placeholder may stand at the start or the end of its human turn (both occur in
    LLaVA's data); like LLaVA's ``preprocess_multimodal`` it is moved to the start, followed by a newline.

    With ``policy="llava"``, three records LLaVA's training code accepts are kept, and each fix is
    appended to ``normalised`` (see :data:`NORMALISATIONS`): a leading gpt turn is dropped
    (``preprocess_v1`` skips it); several ``<image>`` in one human turn become one
    (``preprocess_multimodal`` removes them all and puts one in front); an image record without
    ``<image>`` gets it in front of its first human turn. That last one differs from LLaVA-1.5, which
    keeps such a record but whose model then ignores its image (``image_features[0:0]``): here the
    image is used. ``strict`` rejects all three.

    Raises:
        RecordError: with a stable ``reason`` code when the conversation is unusable.
    """
    fixes: list[str] = normalised if normalised is not None else []
    if not isinstance(conversations, list) or not conversations:
        raise RecordError("empty_conversation", "`conversations` must be a non-empty list")
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordError("malformed_turn", f"turn {i} must be an object with `from` and `value`")
        role = _ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise RecordError("unknown_role", f"turn {i} is from {turn['from']!r}; expected human or gpt")
        if not isinstance(turn["value"], str):
            raise RecordError("non_string_text", f"turn {i} value is {type(turn['value']).__name__}, not a string")
        messages.append({"role": role, "content": turn["value"]})
    start = 1 if messages[0]["role"] == "system" else 0
    if policy == "llava" and len(messages) > start and messages[start]["role"] == "assistant":
        del messages[start]
        fixes.append("dropped_leading_gpt_turn")
    body = messages[start:]
    if not body or body[0]["role"] != "user":
        raise RecordError("first_turn_not_human", "the first turn (after an optional system turn) must be from human")
    for prev, cur in zip(body, body[1:]):
        if prev["role"] == cur["role"]:
            raise RecordError("roles_not_alternating", f"two consecutive {cur['role']} turns")
    if not any(m["role"] == "assistant" for m in body):
        raise RecordError("no_assistant_turn", "the conversation has no gpt turn to learn from")

    if policy == "llava" and has_image:
        for m in messages:
            if m["role"] == "user" and m["content"].count(IMAGE_PLACEHOLDER) > 1:
                m["content"] = IMAGE_PLACEHOLDER + "\n" + m["content"].replace(IMAGE_PLACEHOLDER, "").strip()
                fixes.append("image_placeholders_collapsed")
        if not any(IMAGE_PLACEHOLDER in m["content"] for m in messages):
            body[0]["content"] = IMAGE_PLACEHOLDER + "\n" + body[0]["content"]
            fixes.append("image_placeholder_added")
    count = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if has_image and count == 0:
        raise RecordError("image_without_placeholder", "the record has an image but no <image> in its turns")
    if has_image and count > 1:
        raise RecordError("multiple_image_placeholders", f"{count} <image> placeholders for one image")
    if not has_image and count:
        raise RecordError("placeholder_without_image", "<image> appears but the record has no image")
    for m in messages:
        if IMAGE_PLACEHOLDER in m["content"]:
            if m["role"] != "user":
                raise RecordError("placeholder_not_in_human_turn", "<image> must be in a human turn")
            rest = m["content"].replace(IMAGE_PLACEHOLDER, "").strip()
            m["content"] = (IMAGE_PLACEHOLDER + "\n" + rest).strip()  # an image-only turn is "<image>", as LLaVA's
    return messages


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]

    @property
    def length(self) -> int:
        return len(self.input_ids)


@cache
def _special_split(specials: frozenset[str]) -> re.Pattern[str]:
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")")


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], source: str,
             add_generation_prompt: bool = False, with_mask: bool = True) -> tuple[list[int], list[int]]:
    """Render ``messages`` with the chat template ``source`` and tokenize the text as LLaVA-1.5 was
    trained (``tokenizer_image_token`` over a legacy SentencePiece tokenizer): special tokens (``<s>``,
    ``</s>``, ``<image>``) become their ids and the text between them is tokenized piece by piece, each
    piece as a sequence of its own. A Llama tokenizer then gives those ids whatever its ``legacy``
    flag: the text after ``<s>``, ``</s>`` or ``<image>`` starts a word (``▁A``, ``▁USER``, and the
    ``▁`` LLaVA keeps after the image), where tokenizing the whole string in ``legacy=False`` mode
    (transformers 5's default) glues it to the special token. A byte-level BPE tokenizer gives the same
    ids either way. Returns the ids and, with ``with_mask``, per id 1 where it lies inside
    ``{% generation %}`` (the assistant's answer and end-of-turn token), else 0 (an empty list without).

    Raises:
        TemplateError: the template refuses the messages, or a mask is asked of a tokenizer that
            cannot give character offsets (a Python-only one).
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, spans = render_jinja_template(conversations=[list(messages)], chat_template=source,
                                                return_assistant_tokens_mask=with_mask,
                                                add_generation_prompt=add_generation_prompt,
                                                **tokenizer.special_tokens_map)
    except Exception as e:  # jinja's raise_exception and rendering errors
        raise TemplateError(str(e)) from e
    text, generation = rendered[0], (spans[0] if with_mask else [])
    specials = set(tokenizer.all_special_tokens)
    if tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) not in (None, tokenizer.unk_token_id):
        specials.add(IMAGE_PLACEHOLDER)
    split = _special_split(frozenset(specials))

    def supervised(a: int, b: int) -> int:
        return int(any((a < e and b > s) if b > a else s <= a < e for s, e in generation))

    ids: list[int] = []
    mask: list[int] = []
    pos = 0
    for piece in split.split(text):
        if not piece:
            continue
        if piece in specials:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
            if with_mask:
                mask.append(supervised(pos, pos + len(piece)))
        elif not with_mask:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        else:
            try:
                enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
            except NotImplementedError as e:
                raise TemplateError(f"loss masks need a fast tokenizer (character offsets): {e}") from e
            ids.extend(enc["input_ids"])
            mask.extend(supervised(pos + a, pos + b) for a, b in enc["offset_mapping"])
        pos += len(piece)
    return ids, mask


def tokenize_messages(
    messages: Sequence[dict[str, Any]],
    tokenizer: Any,
    template: str,
    num_image_tokens: int,
    max_length: int,
) -> TokenizedSample:
    """Render ``messages`` with a named template, tokenize, mask, expand ``<image>``, truncate.

    Labels are ``IGNORE_INDEX`` everywhere except assistant tokens and their end-of-turn token.
    Truncation cuts from the end and never through the image tokens.

    Raises:
        TemplateError: unknown template, or the template rejected the messages.
        RecordError: ``too_long`` when nothing supervised survives truncation or the image tokens
            alone do not fit.
    """
    if tokenizer.eos_token is None:
        raise TemplateError("the tokenizer has no end-of-sequence token; set eos_token before tokenizing")
    try:
        ids, mask = chat_ids(tokenizer, messages, chat_template(template))
    except TemplateError as e:
        raise TemplateError(f"template {template!r} cannot render these messages: {e}") from e
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    input_ids: list[int] = []
    labels: list[int] = []
    image_end = 0
    for tok, m in zip(ids, mask):
        if tok == image_id:
            input_ids.extend([image_id] * num_image_tokens)
            labels.extend([IGNORE_INDEX] * num_image_tokens)
            image_end = len(input_ids)
        else:
            input_ids.append(tok)
            labels.append(tok if m else IGNORE_INDEX)
    if len(input_ids) > max_length:
        if image_end > max_length:
            raise RecordError("too_long", f"the image tokens end at {image_end}, past max_length {max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise RecordError("too_long", f"no assistant token is left within max_length {max_length}")
    return TokenizedSample(input_ids, labels)


def tokenize_record(
    record: dict[str, Any], tokenizer: Any, template: str, num_image_tokens: int, max_length: int,
    policy: RecordPolicy = "strict", normalised: list[str] | None = None,
) -> TokenizedSample:
    """Tokenize one LLaVA record (``{id, image?, conversations}``); ``policy`` and ``normalised`` as
    in :func:`llava_turns_to_messages`.

    Raises:
        RecordError: the record is invalid or too long (see :func:`llava_turns_to_messages`).
    """
    has_image = bool(record.get("image"))
    messages = llava_turns_to_messages(record.get("conversations"), has_image, policy, normalised)
    return tokenize_messages(messages, tokenizer, template, num_image_tokens, max_length)


def lone_surrogate(payload: Any) -> str | None:
    """The dotted path of the first string (key or value) holding a lone surrogate, else None.
    Such text cannot be encoded as UTF-8, so it must be refused before it reaches the tokenizer or
    an error message. Iterative: the nesting depth is whatever the JSON parser allowed."""
    stack: list[tuple[str, Any]] = [("", payload)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path or "body"
        elif isinstance(value, dict):
            for k, v in value.items():
                sub = f"{path}.{k}" if path else str(k)
                if _SURROGATE.search(k):
                    return path or "body"
                stack.append((sub, v))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", v) for i, v in enumerate(value))
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")
