"""Constrained decoding of typed answers with xgrammar: a question's grammar (``QuestionTemplate.constraint``:
its choices as EBNF, the regular form of a number, amount or date, or the JSON Schema of a list or object
question's records) compiled once per actor against the model's tokenizer, one matcher per answer, and the
token bitmask each decoding step applies.

Why xgrammar: its matcher fills a packed bitmask of the allowed tokens per row in C++ (microseconds a
token, what vLLM, SGLang and TensorRT-LLM use), which fits our slot decoder (one row per slot, one mask per
step, applied on the device inside the captured step) as well as transformers' ``generate`` (its
``contrib.hf.LogitsProcessor``, the reference our answers are checked against). lm-format-enforcer's
transformers integration does not import under transformers 5; outlines-core needs the vocabulary
rebuilt by hand from each tokenizer's byte encoding, which xgrammar reads from the tokenizer itself."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.grammars import Constraint
from pipeline.structured import SEPARATORS

BITS = 32  # tokens per bitmask word


class Grammars:
    """Compiled grammars of one tokenizer, by constraint; matchers and ``generate`` logits processors."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiler = xgrammar.GrammarCompiler(info)
        self.compiled: dict[Constraint, Any] = {}

    def compile(self, constraint: Constraint) -> Any:
        if constraint not in self.compiled:
            kind, text = constraint
            if kind == "json_schema":  # compact JSON, keys in the schema's order: no token spent on layout
                compiled = self.compiler.compile_json_schema(
                    text, any_whitespace=False, separators=SEPARATORS, strict_mode=True
                )
            else:
                compiled = (self.compiler.compile_regex if kind == "regex" else self.compiler.compile_grammar)(text)
            self.compiled[constraint] = compiled
        return self.compiled[constraint]

    def matcher(self, constraint: Constraint) -> Any:
        """A fresh matcher for one answer."""
        import xgrammar

        return xgrammar.GrammarMatcher(self.compile(constraint))

    def logits_processor(self, constraint: Constraint, rows: int) -> Any:
        """For one ``generate`` call of ``rows`` answers under the same constraint (used once)."""
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor([self.compile(constraint)] * rows)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A packed bitmask (rows, words) of int32, bit j of word i set where token 32 i + j is allowed (xgrammar's
    layout) → a boolean mask (rows, vocab_size). Plain tensor operations: it runs inside a captured step."""
    shifts = torch.arange(BITS, dtype=torch.int32, device=bitmask.device)
    return ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab_size]


def full_bitmask(rows: int, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bitmask allowing every token."""
    return torch.full((rows, -(-vocab_size // BITS)), -1, dtype=torch.int32, device=device)
