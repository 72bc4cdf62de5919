"""Split LLaVA inference: the vision side (vision tower + projector) and the language side (a batched
decode loop from image embeddings + prompt), with no Ray in them.

The Serve deployments, the offline CLI chat and the benchmarks all run these two classes, so the
split path is one piece of code. Feeding the projected image features into the language model's input
embeddings at the ``<image>`` positions is exactly what ``LlavaForConditionalGeneration`` does with
``pixel_values``; greedy output therefore equals ``model.generate(pixel_values=...)`` (tested).

The decode loop is written out rather than calling ``generate`` because each row of a batch carries
its own sampling parameters, seed, stop strings and token limit, and streams its text as it goes.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from llava_platform.data.images import ImageSpec, normalize
from llava_platform.inference.requests import DecodeRequest, StepOutput


def drop_modules(model: Any, keep: str) -> Any:
    """Free the half of a loaded LLaVA a deployment does not run: ``keep="vision"`` drops the
    language model and LM head, ``keep="language"`` drops the vision tower and projector."""
    inner = model.model
    if keep == "vision":
        inner.language_model = torch.nn.Module()
        model.lm_head = torch.nn.Module()
    elif keep == "language":
        inner.vision_tower = torch.nn.Module()
        inner.multi_modal_projector = torch.nn.Module()
    else:
        raise ValueError(f"keep must be 'vision' or 'language', not {keep!r}")
    return model


class ImageEncoderCore:
    """uint8 HWC images -> projected image embeddings, one ``[num_tokens, hidden]`` tensor each."""

    def __init__(self, model: Any, spec: ImageSpec):
        self.model = model.eval()
        self.spec = spec
        first = next(model.model.multi_modal_projector.parameters())
        self.dtype, self.device = first.dtype, first.device

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        pixels = normalize(np.stack(list(images)), self.spec.mean, self.spec.std).to(self.device, self.dtype)
        feats = self.model.model.get_image_features(pixel_values=pixels).pooler_output
        return [f.detach().cpu().clone() for f in feats]  # to CPU: they travel to another replica


# Below this temperature sampling is greedy: dividing logits by a tinier one overflows to inf.
MIN_TEMPERATURE = 1e-4


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from ``softmax(logits / temperature)`` restricted to the top-p nucleus, which
    always keeps the most likely token. Computed in float64 with the maximum subtracted, so no
    temperature or top-p in range can produce inf or nan."""
    scaled = (logits.double() - logits.max().double()) / max(temperature, MIN_TEMPERATURE)
    probs = torch.softmax(scaled, -1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest nucleus
        drop[0] = False
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if not torch.isfinite(probs).all() or probs.sum() <= 0:  # e.g. nan logits from the model
        raise ValueError("the next-token distribution is not finite")
    return int(torch.multinomial(probs, 1, generator=generator))


class _Row:
    """Per-row decoding state: generated ids, text streamed so far, stop handling; ``tag`` is the
    caller's handle on the row."""

    def __init__(self, req: DecodeRequest, tokenizer: Any, eos_ids: set[int], tag: Any = None):
        self.req = req
        self.tag = tag
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.ids: list[int] = []
        self.emitted = ""
        self.done = False
        self.error: str | None = None
        # Any int seed works: OpenAI's are unbounded, torch takes 64 bits.
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed % 2**64)

    def push(self, token: int) -> StepOutput:
        if self.req.cancelled:
            self.done = True
            return StepOutput("", len(self.ids), "cancelled")
        if self.error:
            self.done = True
            return StepOutput("", len(self.ids), "error", error=self.error)
        finish = None
        if token in self.eos_ids:
            finish = "stop"
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        else:
            self.ids.append(token)
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in self.req.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif len(self.ids) >= self.req.max_new_tokens:
                finish = "length"
        if finish is None:
            text = self._safe_prefix(text)
        else:
            self.done = True
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted += delta
        return StepOutput(delta, len(self.ids), finish)

    def _safe_prefix(self, text: str) -> str:
        """Hold back an incomplete UTF-8 character and any tail that could start a stop string."""
        text = text.rstrip("\ufffd")
        hold = 0
        for s in self.req.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return text[: len(text) - hold]


@dataclass
class Batch:
    """Rows decoding together: their KV cache, attention mask (left padding is 0), next positions,
    and the logits their next tokens are chosen from."""

    rows: list[_Row]
    cache: Any
    mask: torch.Tensor
    next_pos: torch.Tensor
    logits: torch.Tensor


class Decoder:
    """Batched decoding from prompt ids + image embeddings with a KV cache.

    Rows are left-padded to one length; positions follow the attention mask, so each row computes
    what it would alone. Each row samples with its own temperature/top-p and seeded generator.
    New rows can join a running batch between steps (:meth:`join`) and finished rows leave it, so a
    server never makes new requests wait for a whole batch to finish.
    """

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_token_id = model.config.image_token_id
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device

    def check(self, request: DecodeRequest, features: Sequence[torch.Tensor]) -> None:
        """Refuse a request whose image tokens and embeddings differ in number (before it joins a batch).

        Raises:
            ValueError: they differ.
        """
        slots = sum(1 for t in request.input_ids if t == self.image_token_id)
        n_feat = sum(f.shape[0] for f in features)
        if slots != n_feat:
            raise ValueError(f"the prompt has {slots} image token(s) but {n_feat} image embedding(s) were given")

    def _row_embeddings(self, input_ids: list[int], features: Sequence[torch.Tensor]) -> torch.Tensor:
        self.check(DecodeRequest(input_ids, 1), features)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        x = self.embed(ids)
        slots = ids == self.image_token_id
        if features:
            x[slots] = torch.cat([f.to(self.device, x.dtype) for f in features])
        return x

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Each row's next token. A row whose sampling fails is marked failed (it finishes with
        ``error`` at :meth:`_Row.push`); its neighbours are untouched."""
        greedy = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            if row.done or row.req.temperature < MIN_TEMPERATURE:
                continue
            try:
                greedy[i] = sample(logits[i].cpu(), row.req.temperature, row.req.top_p, row.generator)
            except Exception as e:  # noqa: BLE001 - a row's failure stays in that row
                row.error = f"sampling failed: {type(e).__name__}: {e}"
        return greedy

    @torch.inference_mode()
    def start(self, requests: Sequence[DecodeRequest], features: Sequence[Sequence[torch.Tensor]],
              tags: Sequence[Any] | None = None) -> "Batch":
        """Prefill a new batch (rows left-padded to one length); its first tokens come from :meth:`step`.

        Raises:
            ValueError: a row's image tokens and embeddings do not match in number.
        """
        tags = list(range(len(requests))) if tags is None else list(tags)
        rows = [_Row(r, self.tokenizer, self.eos_ids, tag) for r, tag in zip(requests, tags)]
        embeds = [self._row_embeddings(r.input_ids, f) for r, f in zip(requests, features)]
        n, longest = len(embeds), max(e.shape[0] for e in embeds)
        x = torch.zeros(n, longest, embeds[0].shape[-1], dtype=embeds[0].dtype, device=self.device)
        mask = torch.zeros(n, longest, dtype=torch.long, device=self.device)
        for i, e in enumerate(embeds):
            x[i, longest - e.shape[0]:] = e
            mask[i, longest - e.shape[0]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        return Batch(rows, out.past_key_values, mask, positions[:, -1:] + 1, out.logits[:, -1].float())

    @torch.inference_mode()
    def join(self, batch: "Batch", new: "Batch") -> "Batch":
        """Merge a freshly prefilled batch into a running one (continuous batching): the shorter KV
        cache and mask are padded on the left, so every row keeps attending to exactly its own tokens."""
        if not batch.rows:
            return new
        la, lb = batch.mask.shape[1], new.mask.shape[1]
        width = max(la, lb)

        def left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
            if length == width:
                return t
            shape = list(t.shape)
            shape[dim] = width - length
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for la_layer, lb_layer in zip(batch.cache.layers, new.cache.layers):
            la_layer.keys = torch.cat([left_pad(la_layer.keys, la, 2), left_pad(lb_layer.keys, lb, 2)])
            la_layer.values = torch.cat([left_pad(la_layer.values, la, 2), left_pad(lb_layer.values, lb, 2)])
        batch.mask = torch.cat([left_pad(batch.mask, la, 1), left_pad(new.mask, lb, 1)])
        batch.next_pos = torch.cat([batch.next_pos, new.next_pos])
        batch.logits = torch.cat([batch.logits, new.logits])
        batch.rows = batch.rows + new.rows
        return batch

    @torch.inference_mode()
    def step(self, batch: "Batch") -> list[tuple[Any, StepOutput]]:
        """Emit one token for every row (``(tag, output)`` pairs), drop the rows that finished, and run
        the forward pass that gives the next tokens' logits."""
        tokens = self._choose(batch.logits, batch.rows)
        outs = []
        for row, tok in zip(batch.rows, tokens):
            out = row.push(tok)
            out.batch_rows = len(batch.rows)
            outs.append((row.tag, out))
        keep = [i for i, row in enumerate(batch.rows) if not row.done]
        if len(keep) < len(batch.rows):
            batch.rows = [batch.rows[i] for i in keep]
            if not keep:
                return outs
            index = torch.tensor(keep, device=self.device)
            batch.cache.batch_select_indices(index)
            batch.mask, batch.next_pos = batch.mask[index], batch.next_pos[index]
            tokens = [tokens[i] for i in keep]
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(keep), 1)], dim=1)
        x = self.embed(torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None])
        out = self.model(inputs_embeds=x, attention_mask=batch.mask, position_ids=batch.next_pos,
                         past_key_values=batch.cache, use_cache=True)
        batch.cache, batch.next_pos = out.past_key_values, batch.next_pos + 1
        batch.logits = out.logits[:, -1].float()
        return outs

    def stream(self, requests: Sequence[DecodeRequest],
               features: Sequence[Sequence[torch.Tensor]]) -> Iterator[list[StepOutput | None]]:
        """Decode a batch; yields one list per step with a :class:`StepOutput` for every row still
        running (``None`` for rows already finished). Ends when every row has finished.

        Raises:
            ValueError: a row's image tokens and embeddings do not match in number.
        """
        batch = self.start(requests, features)
        while batch.rows:
            outs = dict(self.step(batch))
            yield [outs.get(i) for i in range(len(requests))]

    def generate(self, requests: Sequence[DecodeRequest],
                 features: Sequence[Sequence[torch.Tensor]]) -> list[tuple[str, int, str]]:
        """Decode a batch to the end: ``(text, completion_tokens, finish_reason)`` per row."""
        texts = [""] * len(requests)
        result: list[tuple[str, int, str]] = [("", 0, "")] * len(requests)
        for step in self.stream(requests, features):
            for i, out in enumerate(step):
                if out is not None:
                    texts[i] += out.text
                    if out.finish_reason:
                        result[i] = (texts[i], out.completion_tokens, out.finish_reason)
        return result


def load_for_serving(uri: str, storage_config: Any = None, dtype: str = "float32",
                     device: str | None = None) -> tuple[Any, Any]:
    """Load a LLaVA checkpoint (local path, s3://, ``models:/``, ``runs:/``) for inference, on the
    GPU Ray assigned to this process when there is one (``device`` overrides).

    Raises:
        ModelBuildError: nothing loadable at ``uri``.
    """
    from llava_platform.model.builder import load_checkpoint

    model, processor = load_checkpoint(uri, storage_config, dtype=dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor
