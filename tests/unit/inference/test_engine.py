"""The split inference path against plain transformers, and per-row decoding behaviour."""

from __future__ import annotations

import pytest
import torch

from llava_platform.data.images import ImageSpec
from llava_platform.inference.engine import Decoder, ImageEncoderCore, drop_modules, load_for_serving
from llava_platform.inference.requests import DecodeRequest
from llava_platform.inference.prompts import PromptBuilder

from inference_helpers import png, reference_greedy


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, processor = load_for_serving(str(tiny_model_dir))
    spec = ImageSpec.from_model(model.config, processor)
    return model, processor, spec


def _prompt(loaded, text, with_image=True):
    model, processor, spec = loaded
    content = [{"type": "image"}, {"type": "text", "text": text}] if with_image else text
    messages = [{"role": "user", "content": content}]
    return messages, PromptBuilder(processor, model.config, spec).input_ids(messages)


def test_batched_greedy_equals_transformers_generate_per_request(loaded):
    model, processor, spec = loaded
    encoder, decoder = ImageEncoderCore(model, spec), Decoder(model, processor.tokenizer)
    cases = [("red", "What colour is the shape?", True), ("blue", "Describe the image in detail please.", True),
             (None, "hello", False)]
    reqs, feats, refs = [], [], []
    for colour, text, with_image in cases:
        messages, ids = _prompt(loaded, text, with_image)
        images = [png(colour, (30, 44))] if with_image else []
        reqs.append(DecodeRequest(ids, max_new_tokens=12))
        feats.append(encoder([spec.prepare(b, 10**7) for b in images]) if images else [])
        refs.append(reference_greedy(model, processor, spec, messages, images, 12))
    # Prompts of different lengths in one left-padded batch: each row must match its solo run.
    got = decoder.generate(reqs, feats)
    assert [g[0] for g in got] == refs
    assert all(g[1] == 12 and g[2] == "length" for g in got)


def test_encoder_features_have_one_row_per_image_token(loaded):
    model, processor, spec = loaded
    feats = ImageEncoderCore(model, spec)([spec.prepare(png("green"), 10**7)] * 3)
    assert len(feats) == 3 and feats[0].shape == (spec.num_tokens, model.config.text_config.hidden_size)
    assert torch.equal(feats[0], feats[2])


def test_image_token_and_feature_counts_must_match(loaded):
    model, processor, spec = loaded
    _, ids = _prompt(loaded, "what?")
    with pytest.raises(ValueError, match="image token"):
        list(Decoder(model, processor.tokenizer).stream([DecodeRequest(ids, 3)], [[]]))


def test_stop_string_ends_the_row_and_is_not_returned(loaded):
    model, processor, spec = loaded
    decoder = Decoder(model, processor.tokenizer)
    _, ids = _prompt(loaded, "hello", with_image=False)
    full = decoder.generate([DecodeRequest(ids, 16)], [[]])[0][0]
    stop = full[3:6]
    assert stop and stop not in full[:3]
    text, n, finish = decoder.generate([DecodeRequest(ids, 16, stop=[stop])], [[]])[0]
    assert finish == "stop" and text == full[: full.index(stop)] and n < 16


def test_streamed_pieces_add_up_and_stop_text_is_never_streamed(loaded):
    model, processor, spec = loaded
    decoder = Decoder(model, processor.tokenizer)
    _, ids = _prompt(loaded, "hello", with_image=False)
    full = decoder.generate([DecodeRequest(ids, 16)], [[]])[0][0]
    stop = full[5:8]
    pieces = [step[0].text for step in decoder.stream([DecodeRequest(ids, 16, stop=[stop])], [[]]) if step[0]]
    assert "".join(pieces) == full[: full.index(stop)]


def test_sampling_is_reproducible_per_seed_and_independent_of_batch_neighbours(loaded):
    model, processor, spec = loaded
    decoder = Decoder(model, processor.tokenizer)
    _, ids = _prompt(loaded, "hello", with_image=False)
    _, ids2 = _prompt(loaded, "what shapes are there in this picture", with_image=False)
    alone = decoder.generate([DecodeRequest(ids, 10, temperature=1.0, top_p=0.9, seed=7)], [[]])[0]
    paired = decoder.generate([DecodeRequest(ids2, 10, temperature=1.0, seed=1),
                               DecodeRequest(ids, 10, temperature=1.0, top_p=0.9, seed=7)], [[], []])[1]
    assert alone == paired
    other = [decoder.generate([DecodeRequest(ids, 10, temperature=1.5, seed=s)], [[]])[0][0] for s in (1, 2, 3)]
    assert len(set(other)) > 1  # different seeds, different samples


def test_drop_modules_keeps_each_half_working(loaded, tiny_model_dir):
    model, processor = load_for_serving(str(tiny_model_dir))
    spec = ImageSpec.from_model(model.config, processor)
    vision = drop_modules(load_for_serving(str(tiny_model_dir))[0], "vision")
    assert not list(vision.model.language_model.parameters())
    feats = ImageEncoderCore(vision, spec)([spec.prepare(png(), 10**7)])
    assert torch.equal(feats[0], ImageEncoderCore(model, spec)([spec.prepare(png(), 10**7)])[0])
    language = drop_modules(model, "language")
    assert not list(language.model.vision_tower.parameters())
    _, ids = _prompt(loaded, "hi")
    assert Decoder(language, processor.tokenizer).generate([DecodeRequest(ids, 4)], [feats])[0][1] == 4
    with pytest.raises(ValueError, match="keep"):
        drop_modules(model, "both")


def test_rows_joining_and_leaving_a_running_batch_decode_as_they_would_alone(loaded):
    """Continuous batching: a row that joins after some steps, and rows that finish early and
    leave, must not change any row's tokens."""
    model, processor, spec = loaded
    encoder, decoder = ImageEncoderCore(model, spec), Decoder(model, processor.tokenizer)
    cases = [("red", "What colour?", 14), ("blue", "Describe the picture in detail please.", 3),
             ("green", "shape?", 9), (None, "hello there", 6)]
    solo, reqs, feats = [], [], []
    for colour, text, n in cases:
        messages, ids = _prompt(loaded, text, colour is not None)
        images = [png(colour)] if colour else []
        reqs.append(DecodeRequest(ids, n))
        feats.append(encoder([spec.prepare(b, 10**7) for b in images]) if images else [])
        solo.append(reference_greedy(model, processor, spec, messages, images, n))
    texts = {i: "" for i in range(4)}
    batch = decoder.start(reqs[:2], feats[:2], tags=[0, 1])
    for step in range(20):
        if step == 2:  # two rows join a running batch, one of them with a longer prompt
            batch = decoder.join(batch, decoder.start(reqs[2:], feats[2:], tags=[2, 3]))
        if not batch.rows:
            break
        for tag, out in decoder.step(batch):
            texts[tag] += out.text
    assert [texts[i] for i in range(4)] == solo


def test_a_cancelled_row_leaves_at_the_next_step_and_its_neighbour_is_unchanged(loaded):
    model, processor, spec = loaded
    decoder = Decoder(model, processor.tokenizer)
    messages, ids = _prompt(loaded, "hello", with_image=False)
    alone = reference_greedy(model, processor, spec, messages, [], 10)
    keep, drop = DecodeRequest(ids, 10), DecodeRequest(ids, 10)
    batch = decoder.start([keep, drop], [[], []], tags=["keep", "drop"])
    texts, finishes, rows = {"keep": "", "drop": ""}, {}, []
    for step in range(12):
        if step == 3:
            drop.cancelled = True
        if not batch.rows:
            break
        for tag, out in decoder.step(batch):
            texts[tag] += out.text
            if out.finish_reason:
                finishes[tag] = (out.finish_reason, out.completion_tokens)
        rows.append(len(batch.rows))
    assert finishes == {"drop": ("cancelled", 3), "keep": ("length", 10)}
    assert rows[:5] == [2, 2, 2, 1, 1]  # the cancelled row left the batch (and its cache) at once
    assert texts["keep"] == alone


@pytest.mark.parametrize("temperature, top_p", [(1e-300, 1.0), (5e-324, 1.0), (1.0, 1e-300), (1e-300, 1e-300)])
def test_extreme_sampling_parameters_are_safe_and_near_greedy(loaded, temperature, top_p):
    # Measured before: temperature=1e-300 (or top_p=1e-300) gave inf/nan probabilities and the
    # exception failed every row in the batch. Both limits of sampling are greedy decoding.
    model, processor, spec = loaded
    decoder = Decoder(model, processor.tokenizer)
    messages, ids = _prompt(loaded, "hello", with_image=False)
    greedy = reference_greedy(model, processor, spec, messages, [], 8)
    out = decoder.generate([DecodeRequest(ids, 8, temperature=temperature, top_p=top_p, seed=3),
                            DecodeRequest(ids, 8)], [[], []])
    assert [o[0] for o in out] == [greedy, greedy] and {o[2] for o in out} == {"length"}


def test_a_row_whose_sampling_fails_finishes_alone_with_an_error(loaded):
    model, processor, spec = loaded
    decoder = Decoder(model, processor.tokenizer)
    messages, ids = _prompt(loaded, "hello", with_image=False)
    alone = reference_greedy(model, processor, spec, messages, [], 6)
    batch = decoder.start([DecodeRequest(ids, 6), DecodeRequest(ids, 6, temperature=1.0, seed=0)], [[], []],
                          tags=["good", "bad"])
    batch.logits = batch.logits.clone()
    batch.logits[1] = float("nan")  # what a numerically broken row looks like to the sampler
    texts, finishes = {"good": "", "bad": ""}, {}
    while batch.rows:
        for tag, out in decoder.step(batch):
            texts[tag] += out.text
            if out.finish_reason:
                finishes[tag] = (out.finish_reason, out.error)
    assert finishes["bad"][0] == "error" and "not finite" in finishes["bad"][1]
    assert finishes["good"] == ("length", None) and texts["good"] == alone
