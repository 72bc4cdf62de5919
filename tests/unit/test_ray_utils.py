import os

from llava_platform.ray_utils import set_accelerator_env


def test_accelerator_env_respects_the_user(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    set_accelerator_env()
    import torch

    assert os.environ["DS_ACCELERATOR"] == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    set_accelerator_env()
    assert os.environ["DS_ACCELERATOR"] == "cuda"
