"""Chat prompts that ask for the XML chain-of-thought format and carry the active principle set.

A system message states the principles and the format; one worked example is given as a prior chat turn; the
assistant turn is pre-filled with the opening ``<reasoning>`` tag. Small instruct models rarely produce the
strict format from instructions alone; the worked example and the prefill give GRPO groups with unequal
rewards from the first step. The prefill counts as part of the completion for rewards (it is prepended to the
decoded text) but not for log-probabilities (it is part of the prompt tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PromptTemplate:
    """How a question becomes chat messages (``conf/prompt/*.yaml``)."""

    system: str
    user: str = "{question}"
    examples: list[dict] = field(default_factory=list)  # worked turns: {question, rationale, answer}
    prefill: str = "<reasoning>\n"

    def messages(self, question: str, principles: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system.format(principles=principles.strip()).strip()}]
        for ex in self.examples:
            msgs.append({"role": "user", "content": self.user.format(question=ex["question"])})
            msgs.append({"role": "assistant", "content": format_completion(ex["rationale"], ex["answer"])})
        msgs.append({"role": "user", "content": self.user.format(question=question)})
        return msgs

    def render(self, tokenizer, question: str, principles: str) -> str:
        """The prompt string: chat template with the generation prompt, then the assistant prefill."""
        text = tokenizer.apply_chat_template(
            self.messages(question, principles), tokenize=False, add_generation_prompt=True
        )
        return text + self.prefill


def format_completion(rationale: str, answer: str) -> str:
    """A completion in the strict format."""
    return f"<reasoning>\n{rationale.strip()}\n</reasoning>\n<answer>\n{str(answer).strip()}\n</answer>"
