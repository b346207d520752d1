"""Shared fixtures: one complete tiny run (prepare -> index -> train) built once per test session.

It uses configs/tiny.yaml: 40 real ML-100K users (all 1,682 items), a small RQ-VAE, and a 2-layer random Llama
with SmolLM2's real tokenizer, trained for a few steps. Tests that need a tuned model, a catalogue with codes or
a running app all share it.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from lcrec_chat import stages
    from lcrec_chat.config import load_config
    run_dir = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config("configs/tiny.yaml", [f"run_dir={run_dir}"])
    stages.prepare(cfg)
    stages.index(cfg)
    stages.train(cfg)
    return cfg
