"""Prompts for one model: a conversation rendered with its chat template, tokenized as training
tokenized it, each ``<image>`` expanded to the image's embeddings, and the completion budget checked
against the model's context.

Everything here raises :class:`PromptError` (with the request parameter at fault and a code); the
Serve Gateway answers it as a 400 and offline evaluation records it beside the question.
"""

from __future__ import annotations

from typing import Any, Sequence

from llava_platform.config.schema import STAGE_TEMPLATES
from llava_platform.data.conversation import chat_ids, chat_template
from llava_platform.data.images import ImageSpec
from llava_platform.errors import LlavaPlatformError, TemplateError


class PromptError(LlavaPlatformError, ValueError):
    """A conversation this model cannot be prompted with: ``message`` for a person, ``param`` the
    part of the request at fault, ``code`` a stable name for it."""

    def __init__(self, message: str, param: str | None, code: str):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class PromptBuilder:
    """Renders and tokenizes conversations for one model and checks them against its context."""

    def __init__(self, processor: Any, model_config: Any, spec: ImageSpec, max_new_tokens: int = 1024,
                 max_prompt_chars: int = 262_144, template: str | None = None):
        """``template``: a named conversation template (``vicuna_v1``, ``llava_v1``, ``plain``) instead
        of the model's own chat template (the one it was trained with; ``vicuna_v1`` when it has none).
        ``max_new_tokens``: the most a completion may ask for; ``max_prompt_chars``: the most text."""
        self.tokenizer = processor.tokenizer
        own = getattr(processor, "chat_template", None)
        self.template = chat_template(template) if template else (own or chat_template(STAGE_TEMPLATES["finetune"]))
        self.image_token_id = model_config.image_token_id
        self.context_length = int(model_config.text_config.max_position_embeddings)
        self.spec = spec
        self.max_new_tokens_limit = max_new_tokens
        self.max_prompt_chars = max_prompt_chars

    def check_text(self, chars: int) -> None:
        """Refuse text over ``max_prompt_chars`` before tokenizing it (which costs time in proportion).

        Raises:
            PromptError: too long.
        """
        if chars > self.max_prompt_chars:
            raise PromptError(f"the messages hold {chars} characters of text, over this server's limit of "
                              f"{self.max_prompt_chars}", "messages", "prompt_too_long")

    def input_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Tokenized prompt ending in the assistant's turn, with each ``<image>`` expanded.

        Raises:
            PromptError: the last turn is the assistant's, the template refuses the conversation (e.g.
                roles out of order), or the text holds the reserved image token.
        """
        if messages and messages[-1]["role"] == "assistant":
            raise PromptError("the last message must be from the user (or system), not the assistant",
                              f"messages.{len(messages) - 1}.role", "invalid_role")
        try:  # the ids training used (LLaVA's tokenization of the rendered prompt)
            ids, _ = chat_ids(self.tokenizer, messages, self.template, add_generation_prompt=True, with_mask=False)
        except TemplateError as e:  # jinja's raise_exception
            raise PromptError(f"the conversation cannot be rendered for this model: {e}", "messages",
                              "invalid_conversation") from e
        images = sum(1 for m in messages if not isinstance(m["content"], str)
                     for p in m["content"] if p.get("type") == "image")
        if ids.count(self.image_token_id) != images:
            raise PromptError(f"the message text contains the model's reserved image token "
                              f"{self.tokenizer.convert_ids_to_tokens(self.image_token_id)!r}; send images as "
                              "image_url parts and leave the token out of the text", "messages", "invalid_content")
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.spec.num_tokens if t == self.image_token_id else [t])
        return out

    def completion_budget(self, asked: int | None, param: str, prompt_tokens: int) -> int:
        """The completion's token budget: ``asked`` (None: as much as fits, up to the limit), checked
        against the limit and the room the prompt leaves in the context.

        Raises:
            PromptError: out of range, or the prompt (plus the requested completion) does not fit.
        """
        limit = self.max_new_tokens_limit
        if asked is not None and not 1 <= asked <= limit:
            raise PromptError(f"`{param}` must be between 1 and {limit}, got {asked}", param, "invalid_value")
        room = self.context_length - prompt_tokens
        if room < 1 or (asked is not None and asked > room):
            raise PromptError(f"This model's maximum context length is {self.context_length} tokens. However, "
                              f"you requested {prompt_tokens + (asked or 1)} tokens ({prompt_tokens} in the messages, "
                              f"{asked or 1} in the completion). Please reduce the length of the messages or "
                              "completion.", "messages", "context_length_exceeded")
        return asked if asked is not None else min(room, limit)
