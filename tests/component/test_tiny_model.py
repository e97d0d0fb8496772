"""Building the tiny model (`colocate model tiny`, and `model.build_tiny` in the config): trains a
tokenizer and draws weights (tokenizers, transformers, torch). Component tier: no Ray cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.config import parse_config
from orchestrator.serving.app import resolve_model_source

pytestmark = pytest.mark.component

runner = CliRunner()


def test_model_tiny_is_deterministic_and_has_a_chat_template(tmp_path):
    for name in ("a", "b"):
        result = runner.invoke(app, ["model", "tiny", "--out", str(tmp_path / name), "--size", "test"])
        assert result.exit_code == 0, result.output
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n") and "<|user|>\nhello<|end|>" in text
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] in (32, 64, 80, 96, 112, 128)


def test_model_source_with_build_tiny_builds_the_missing_directory(tmp_path):
    built = parse_config({"model": {"source": str(tmp_path / "built"), "build_tiny": "test"}})
    assert Path(resolve_model_source(built), "config.json").is_file()
