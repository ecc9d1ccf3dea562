"""Principle sets: an organisation's principles as text, with their antithesis (``conf/principles/*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PrincipleSet:
    """A named set of principles and the contrasting variants SAMI and SI use.

    ``text`` is what training prompts carry. ``antithesis`` states the opposite policy; ``variants`` adds further
    contrasting texts. The K variants of a set are ``[text, antithesis, *variants]`` truncated to K.
    """

    name: str
    text: str
    antithesis: str = ""
    variants: list[str] = field(default_factory=list)
    description: str = ""

    def all_variants(self) -> list[str]:
        return [v for v in [self.text, self.antithesis, *self.variants] if v and v.strip()]
