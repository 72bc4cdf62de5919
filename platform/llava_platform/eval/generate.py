"""Batch answer generation on Ray Data: a question file in LLaVA's model_vqa format -> answers in
LLaVA's answer format, from a pool of model actors that each decode a batch of questions together
(LLaVA's ``model_vqa`` answers one question per forward pass).

Each question is answered twice when the blind baseline is on: with its image, and with the image
withheld (the same text, no ``<image>``), in the same batch.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np

from llava_platform import storage
from llava_platform.config.schema import EvalConfig, ModelSpec, StorageConfig
from llava_platform.errors import LlavaPlatformError, RecordError

QUESTION_FIELDS = ("question_id", "image", "text")


class EvalError(LlavaPlatformError):
    """The evaluation cannot run: unreadable or malformed question file, answer key, or model."""


def read_jsonl(uri: str, storage_config: StorageConfig | None, what: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file (local or s3://).

    Raises:
        EvalError: missing file, or a line that is not a JSON object (named by line number).
    """
    try:
        raw = storage.read_bytes(uri, storage_config)
    except (FileNotFoundError, OSError) as e:
        raise EvalError(f"cannot read the {what} {uri}: {e}") from e
    rows = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{uri} line {n}: not valid JSON ({e})") from e
        if not isinstance(row, dict):
            raise EvalError(f"{uri} line {n}: expected a JSON object")
        rows.append(row)
    return rows


def read_questions(uri: str, storage_config: StorageConfig | None = None) -> list[dict[str, Any]]:
    """model_vqa questions (``question_id``, ``image``, ``text``, optional ``category``).

    Raises:
        EvalError: a row lacks a field, or a question id repeats.
    """
    rows = read_jsonl(uri, storage_config, "question file")
    seen: set[str] = set()
    for n, row in enumerate(rows, 1):
        missing = [f for f in QUESTION_FIELDS if f not in row]
        if missing:
            raise EvalError(f"{uri} question {n} ({row.get('question_id', '?')}): missing {', '.join(missing)}")
        qid = str(row["question_id"])
        if qid in seen:
            raise EvalError(f"{uri}: question_id {qid} appears twice")
        seen.add(qid)
    if not rows:
        raise EvalError(f"{uri} holds no questions")
    return rows


class AnswerModel:
    """A Ray Data actor holding one model: a batch of questions in, their answers out."""

    def __init__(self, model: ModelSpec, cfg: EvalConfig, storage_config: StorageConfig, model_id: str,
                 tracking_uri: str | None = None, use_gpu: bool = False):
        import torch

        from llava_platform.data.images import Decoding
        from llava_platform.model.builder import build_model
        from llava_platform.data.images import ImageSpec
        from llava_platform.inference.engine import Decoder, ImageEncoderCore, load_for_serving
        from llava_platform.inference.prompts import PromptBuilder
        from llava_platform.tracking.runs import use_tracking_uri

        use_tracking_uri(tracking_uri)
        if model.checkpoint is not None:
            loaded, processor = load_for_serving(model.checkpoint, storage_config, model.dtype)
        else:  # a preset or a composition: built here (random projector), for smoke runs
            loaded, processor = build_model(model, storage_config)
            loaded = loaded.to("cuda" if use_gpu and torch.cuda.is_available() else "cpu").eval()
        self.spec = ImageSpec.from_model(loaded.config, processor, cfg.image_aspect_ratio, Decoding.from_config(cfg))
        self.prompts = PromptBuilder(processor, loaded.config, self.spec, max_new_tokens=cfg.max_new_tokens,
                                     template=cfg.template)
        self.encoder, self.decoder = ImageEncoderCore(loaded, self.spec), Decoder(loaded, processor.tokenizer)
        self.cfg, self.storage, self.model_id = cfg, storage_config, model_id

    def _image(self, name: str) -> tuple[np.ndarray | None, str | None]:
        try:
            raw = storage.read_bytes(storage.join(self.cfg.image_root, name), self.storage)
            return self.spec.prepare(raw, self.cfg.max_image_pixels), None
        except FileNotFoundError:
            return None, f"image_missing: {name}"
        except RecordError as e:
            return None, f"{e.reason}: {e.detail}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from llava_platform.inference.requests import DecodeRequest
        from llava_platform.inference.prompts import PromptError

        n = len(batch["question_id"])
        loaded = [self._image(str(batch["image"][i])) for i in range(n)]
        present = [i for i in range(n) if loaded[i][0] is not None]
        feats = dict(zip(present, self.encoder([loaded[i][0] for i in present]))) if present else {}
        modes = ("image", "blind") if self.cfg.blind_baseline else ("image",)
        out: dict[str, list] = {k: [] for k in ("question_id", "prompt", "text", "answer_id", "model_id", "metadata",
                                                "category", "mode", "error")}
        reqs, req_feats, slots = [], [], []
        for i in range(n):
            question = str(batch["text"][i])
            for mode in modes:
                error = loaded[i][1] if mode == "image" else None
                ids = None
                if error is None:
                    content: Any = ([{"type": "image"}, {"type": "text", "text": question}] if mode == "image"
                                    else question)
                    try:
                        ids = self.prompts.input_ids([{"role": "user", "content": content}])
                    except PromptError as e:
                        error = f"prompt: {e.message}"
                slots.append((i, mode, error, len(reqs) if ids is not None else None))
                if ids is not None:
                    reqs.append(DecodeRequest(ids, self.cfg.max_new_tokens))
                    req_feats.append([feats[i]] if mode == "image" else [])
        answers = self.decoder.generate(reqs, req_feats) if reqs else []
        for i, mode, error, k in slots:
            text, n_tokens, finish = answers[k] if k is not None else ("", 0, "error")
            category = batch["category"][i] if "category" in batch else None
            out["question_id"].append(str(batch["question_id"][i]))
            out["prompt"].append(str(batch["text"][i]))
            out["text"].append(text.strip())
            out["answer_id"].append(uuid.uuid4().hex)
            out["model_id"].append(self.model_id)
            out["metadata"].append(json.dumps({"completion_tokens": n_tokens, "finish_reason": finish}))
            out["category"].append(None if category is None else str(category))
            out["mode"].append(mode)
            out["error"].append(error)
        return out


def generate_answers(questions: list[dict[str, Any]], model: ModelSpec, cfg: EvalConfig,
                     storage_config: StorageConfig, model_id: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Answer every question on a Ray Data actor pool; rows come back in question order, the
    blind answer (``mode == "blind"``) after the image answer of the same question."""
    import ray.data

    order = {str(q["question_id"]): k for k, q in enumerate(questions)}
    items = [{"question_id": str(q["question_id"]), "image": str(q["image"]), "text": str(q["text"]),
              "category": str(q.get("category", "all"))} for q in questions]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // cfg.batch_size, 64)))
    ds = ds.map_batches(
        AnswerModel,
        fn_constructor_kwargs={"model": model, "cfg": cfg, "storage_config": storage_config, "model_id": model_id,
                               "tracking_uri": tracking_uri, "use_gpu": cfg.use_gpu},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if cfg.use_gpu else 0,
    )
    rows = ds.take_all()
    rows.sort(key=lambda r: (order[r["question_id"]], r["mode"] != "image"))
    return rows
