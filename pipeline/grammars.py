"""The forms typed answers are decoded under: a choice's or a boolean's allowed answers as an EBNF grammar,
and the regular forms of numbers, amounts and dates that ``constrained: true`` opts into (compiled by
xgrammar in actors/constraints.py; the value is then parsed by pipeline/values.py in the configured
locale)."""

from __future__ import annotations

import json

Constraint = tuple[str, str]  # ("ebnf" | "regex" | "json_schema", grammar text)
BOOLEAN_ANSWERS = ["yes", "no"]  # a boolean question's answers: true, false
# The forms `constrained: true` decodes number, money and date answers under (regular grammars; the value is
# then parsed by pipeline/values.py, in the configured locale).
AMOUNT = r"-?[0-9]+([.,' ][0-9]+)*"
CURRENCY = r"([A-Z]{3}|[$€£¥₹])"
MONTH = r"[^ 0-9,./\-]+"  # a month's name, in any language
CONSTRAINED_FORMS = {
    "number": AMOUNT,
    "money": rf"({CURRENCY} ?)?{AMOUNT}( ?{CURRENCY})?",
    "date": "|".join(  # 2025-11-03, 03/11/2025, 3 Nov 2025, 3. März 2025, November 3, 2025
        [
            r"[0-9]{1,4}[-/.][0-9]{1,2}[-/.][0-9]{1,4}",
            rf"[0-9]{{1,2}}\.? {MONTH}\.? [0-9]{{4}}",
            rf"{MONTH}\.? [0-9]{{1,2}},? [0-9]{{4}}",
        ]
    ),
}


def choice_grammar(allowed: list[str]) -> Constraint:
    """An answer that is one of ``allowed``, as written or capitalized, after an optional space (EBNF string
    literals take JSON's escapes)."""
    spellings = dict.fromkeys(form for answer in allowed for form in (answer, answer[:1].upper() + answer[1:]))
    literals = " | ".join(json.dumps(spelling, ensure_ascii=False) for spelling in spellings)
    return "ebnf", f'root ::= " "? ({literals})'


def form_grammar(answer_type: str) -> Constraint:
    """An answer in the regular form of ``answer_type`` (number, money, date), after an optional space."""
    return "regex", f" ?({CONSTRAINED_FORMS[answer_type]})"


def check_choices(answer_type: str, choices: list[str] | None) -> None:
    """Raise unless ``choices`` fit ``answer_type``: at least two distinct for choice, none for any other."""
    if answer_type == "choice":
        if not choices or len(choices) < 2:
            raise ValueError("type choice needs `choices`: at least two allowed answers")
        if len(set(choices)) < len(choices):
            raise ValueError(f"choices must be distinct: {choices}")
    elif choices is not None:
        raise ValueError(f"`choices` is for type choice, not type {answer_type}")
