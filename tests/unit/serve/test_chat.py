"""Terminal chat: a local model with no server (a real subprocess) and the Serve endpoint."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from inference_helpers import png, reference_greedy

from llava_platform.serve.chat import ChatError, EndpointBackend, LocalBackend, chat_loop, image_part
from llava_platform.data.images import ImageSpec
from llava_platform.inference.engine import load_for_serving


def _reference(model_dir, raw: bytes, question: str, n: int) -> str:
    model, processor = load_for_serving(str(model_dir))
    spec = ImageSpec.from_model(model.config, processor)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return reference_greedy(model, processor, spec, messages, [raw], n)


def test_local_chat_as_a_user_runs_it(tiny_model_dir, tmp_path):
    raw = png("red", (32, 32))
    (tmp_path / "red.png").write_bytes(raw)
    proc = subprocess.run([sys.executable, "-m", "llava_platform.cli", "chat", "--model", str(tiny_model_dir),
                           "--image", str(tmp_path / "red.png"), "--temperature", "0", "--max-tokens", "6"],
                          input=b"What colour is it?\nAnd the shape?\n\n", capture_output=True, timeout=300)
    stdout = proc.stdout.decode()  # not text=True: the answer may hold a \r that must stay
    assert proc.returncode == 0, proc.stderr.decode()
    assert stdout.count("USER: ASSISTANT: ") == 2, stdout
    first = "USER: ASSISTANT: " + _reference(tiny_model_dir, raw, "What colour is it?", 6) + "\nUSER: "
    assert first in stdout


def test_local_backend_keeps_the_conversation(tiny_model_dir):
    backend = LocalBackend(str(tiny_model_dir))
    questions = iter(["colour?", "shape?", "exit", "never asked"])
    out = io.StringIO()
    convo = chat_loop(backend, None, read=lambda prompt: next(questions), out=out, max_tokens=3, temperature=0)
    assert [m["role"] for m in convo] == ["user", "assistant", "user", "assistant"]
    assert out.getvalue().count("ASSISTANT: ") == 2


def test_bad_image_path_is_a_clear_error_before_any_model_loads(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llava_platform.cli", "chat", "--model", "/nonexistent/model",
                           "--image", str(tmp_path / "missing.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot read image" in proc.stderr and "missing.png" in proc.stderr
    with pytest.raises(ChatError, match="cannot reach"):
        EndpointBackend("http://127.0.0.1:9")  # nothing listens on the discard port


@pytest.mark.ray
def test_endpoint_chat_streams_the_servers_answer(serve_app, tmp_path):
    import openai

    raw = png("blue", (32, 32))
    (tmp_path / "blue.png").write_bytes(raw)
    backend = EndpointBackend(serve_app.url)
    assert backend.model == "llava"
    questions = iter(["What colour is it?", ""])
    out = io.StringIO()
    convo = chat_loop(backend, tmp_path / "blue.png", read=lambda p: next(questions), out=out, max_tokens=6,
                      temperature=0)
    direct = openai.OpenAI(base_url=f"{serve_app.url}/v1", api_key="x").chat.completions.create(
        model="llava", messages=[{"role": "user", "content": [image_part(tmp_path / "blue.png"),
                                                              {"type": "text", "text": "What colour is it?"}]}],
        max_tokens=6, temperature=0)
    assert convo[-1]["content"] == direct.choices[0].message.content
    with pytest.raises(ChatError, match="refused the request \\(400\\).*between 1 and 64"):
        list(backend.stream([{"role": "user", "content": "hi"}], max_tokens=500, temperature=0))
