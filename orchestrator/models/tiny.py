"""Build a small, deterministic, random-weight Llama model that vLLM can load offline.

No hub access is available (or wanted) in tests, so the tokenizer is trained locally on a
seeded synthetic corpus and the weights are drawn from a seeded generator. The same size and
seed always give byte-identical weights and tokenizer files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class TinySize:
    """Architecture of one model size. CPU attention in vLLM needs head_dim in {32, 64, 80, ...}."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int


SIZES: dict[str, TinySize] = {
    # As small as vLLM-on-CPU accepts: fast engine start, fast tests.
    "test": TinySize(512, 64, 2, 2, 2, 128, 2048),
    # ~50M parameters: step time grows with batch size, so interference between requests is real.
    "bench": TinySize(8192, 768, 8, 12, 12, 2048, 4096),
}

_WORDS = (
    "the a of to and in is for on with as by at from this that it be are was model token batch "
    "request online offline latency budget replica engine cluster chat summary paper result "
    "method data train test step time queue serve load trace prompt output length prefill decode "
    "cache memory throughput policy admit throttle schedule predict profile measure report value "
    "system user assistant question answer explain why how what when where which number small "
    "large fast slow first last next every some many few more less high low good bad new old"
).split()


def _corpus(seed: int, num_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 24))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 10_000)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int, seed: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1_000_000
    fast.save_pretrained(out_dir)


def build_tiny_model(out_dir: str | Path, size: str = "test", seed: int = 0) -> Path:
    """Write a loadable model directory (config, safetensors weights, tokenizer) to `out_dir`."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known sizes: {sorted(SIZES)}")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, spec.vocab_size, seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    num_params = sum(p.numel() for p in model.parameters())
    (out / "colocate_tiny.json").write_text(
        json.dumps({"size": size, "seed": seed, "num_params": num_params}, indent=2) + "\n"
    )
    return out


def is_model_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (p / "tokenizer_config.json").is_file()
