"""A tiny random Llama with a locally trained BPE tokenizer, for smoke runs and tests (no download).

``tiny:llama`` builds, once per size, a byte-level BPE tokenizer trained on the bundled data plus the XML tags
and ChatML markers, and a randomly initialised Llama of the given size, then saves both as a normal checkpoint
that the Auto classes reload. Llama is used because its tokenizer round-trips unchanged through the Auto classes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .embedded import default_cache_dir

TINY_PREFIX = "tiny:"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    from ..data.datasets import bundled_path

    texts = ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "system", "user", "assistant"]
    with open(bundled_path("train")) as f:
        for line in f:
            row = json.loads(line)
            texts += [row["source"], row["rationale"], row["target"]]
    return texts


def build_tiny_llama(
    out_dir: str | Path | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Build (or reuse) the tiny checkpoint and return its folder."""
    key = hashlib.sha1(f"{hidden_size}-{num_layers}-{num_heads}-{vocab_size}-{seed}-v1".encode()).hexdigest()[:10]
    out = Path(out_dir) if out_dir else default_cache_dir() / "models" / f"tiny-llama-{key}"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        padding_side="left",
    )
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + f".tmp{torch.randint(0, 10**9, ()).item()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process built it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
