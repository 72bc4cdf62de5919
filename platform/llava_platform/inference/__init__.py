"""Inference without Ray or HTTP, below both ``serve/`` and ``eval/``: the split engine (vision side,
batched decode loop) and prompt building."""
