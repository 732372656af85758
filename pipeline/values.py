"""Typed values of answers: numbers, amounts with their currency, dates, booleans and choices, read with
maintained libraries (price-parser for amounts, babel for locale data, dateparser for dates). What is ours
is only the glue: which library reads which type, and how the locale's conventions are handed to them.

Each answer of a typed question gets the value columns (VALUE_COLUMNS): its value in the column of its
type and ``value_status`` ``parsed``, or ``unparsed`` with the reason (the answer is kept either way). Text
questions get nulls.

A value is ``parsed`` only when the answer reads as one: the amount (with its currency), number or date
makes up the answer, with at most MAX_WORDS_AROUND words around it ("Total: $45.10", "45.10 EUR due",
"dated 3 Nov 2025"). The libraries find a number in almost anything (price-parser reads 3 in
"xR,x3VM_e;;;;", 2025 in "INV-2025-0042"): what is left around the value must be plain words, or a lone
separator, never other digits or runs of symbols. That check is ours (the libraries have no such mode)."""

from __future__ import annotations

import datetime
import re
from functools import cached_property
from typing import Any

from pipeline.config import ValuesConfig
from pipeline.grammars import BOOLEAN_ANSWERS
from pipeline.questions import QuestionTemplate
from pipeline.structured import RecordField

VALUE_COLUMNS = ("value_number", "value_currency", "value_date", "value_boolean", "value_status")
MAX_WORDS_AROUND = 5
# A word: letters, with apostrophes, dots or hyphens inside (o'clock, U.S, pre-tax); no digits.
WORD = re.compile(r"[^\W\d_]+(?:['\u2019.\-][^\W\d_]+)*")
OPENING, CLOSING = "([{\"'\u201c\u2018\u00ab", ")]}\"'\u201d\u2019\u00bb.,:;!?"
# What may stand alone between words and a value: a separator, a sign, an accounting parenthesis.
LONE_MARKS = set(":-\u2013\u2014\u2212=/|()")  # with en and em dashes and the minus sign
PARSED, UNPARSED = "parsed", "unparsed"
SEPARATOR = re.compile(r"[.,]")
MINUS_SIGNS = ("-", "\u2212")


class ValueParser:
    """The value columns of answers, read in ``config.locale``."""

    def __init__(self, config: ValuesConfig) -> None:
        from babel import Locale

        self.locale = Locale.parse(config.locale)
        self.day_first = config.day_first

    @cached_property
    def date_order(self) -> str:
        """dateparser's DATE_ORDER: day_first, else the order of the locale's short date format (d/M/y)."""
        if self.day_first is not None:
            return "DMY" if self.day_first else "MDY"
        pattern = self.locale.date_formats["short"].pattern
        fields = sorted((pattern.find(letter), letter) for letter in "dMy" if letter in pattern)
        return "".join(letter.upper() for _, letter in fields)

    @cached_property
    def languages(self) -> list[str]:
        """The locale's language, and English (the language of the models' answers)."""
        return list(dict.fromkeys([self.locale.language, "en"]))

    @cached_property
    def currency_codes(self) -> dict[str, str]:
        """Currency symbol → ISO 4217 code in this locale: where several currencies share a symbol ($), the
        territory's own currency; then the symbols English writes for the rest."""
        from babel import Locale
        from babel.numbers import get_territory_currencies

        home = set(get_territory_currencies(self.locale.territory)) if self.locale.territory else set()

        def by_symbol(locale: Locale) -> dict[str, str]:
            ordered = sorted(locale.currency_symbols.items(), key=lambda item: item[0] in home)  # home last: wins
            return {symbol: code for code, symbol in ordered}

        codes = {**by_symbol(Locale.parse("en")), **by_symbol(self.locale)}
        return codes

    def parse(self, question: QuestionTemplate | RecordField, answer: str | None) -> dict[str, Any]:
        """The value columns of ``answer`` to ``question`` (or a record's field), plus ``error`` when it could
        not be read; for a choice or boolean also ``answer``: the allowed answer as configured (``Yes`` →
        ``yes``)."""
        columns: dict[str, Any] = dict.fromkeys(VALUE_COLUMNS)
        if question.type == "text" or answer is None:
            return columns
        try:
            columns.update(getattr(self, f"_{question.type}")(question, answer.strip()))
            columns["value_status"] = PARSED
        except ValueError as error:
            columns.update(value_status=UNPARSED, error=f"{question.type} not read from the answer: {error}")
        return columns

    def _choice(self, question: QuestionTemplate, answer: str) -> dict[str, Any]:
        """The allowed answer as configured (the grammar also lets the model capitalize it)."""
        allowed = question.allowed_answers or []
        matches = [choice for choice in allowed if choice.casefold() == answer.casefold()]
        if not matches:
            raise ValueError(f"{answer!r} is not one of {allowed}")
        return {"answer": matches[0]}

    def _boolean(self, question: QuestionTemplate, answer: str) -> dict[str, Any]:
        yes, no = BOOLEAN_ANSWERS
        if answer.casefold() not in (yes, no):
            raise ValueError(f"{answer!r} is neither {yes!r} nor {no!r}")
        return {"answer": answer.casefold(), "value_boolean": answer.casefold() == yes}

    def _number(self, question: QuestionTemplate, answer: str) -> dict[str, Any]:
        return {"value_number": self._amount(answer)[0]}

    @staticmethod
    def _check_surroundings(answer: str, found: list[str], kind: str, text: str | None = None) -> None:
        """Raise unless ``answer`` (as ``text``, where given) less the ``found`` parts (the value's own text) is
        at most a few words, none of them written against the value ("VRP5MTI" holds no amount)."""
        rest = answer if text is None else text
        for part in found:
            start = rest.find(part)
            before, after = rest[start - 1 : start], rest[start + len(part) : start + len(part) + 1]
            if before.isalnum() or after.isalnum():
                raise ValueError(f"the {kind} {part!r} is written against other letters or digits in {answer!r}")
            rest = rest[:start] + " " + rest[start + len(part) :]
        words = 0
        for token in rest.split():
            core = token.lstrip(OPENING).rstrip(CLOSING)
            if core and WORD.fullmatch(core):
                words += 1
            elif len(token) > 2 or not set(token) <= LONE_MARKS | set(CLOSING):
                raise ValueError(f"{token!r} around the {kind} in {answer!r} is not a word")
        if words > MAX_WORDS_AROUND:
            raise ValueError(f"{words} words around the {kind} in {answer!r}, more than {MAX_WORDS_AROUND}")

    def _money(self, question: QuestionTemplate, answer: str) -> dict[str, Any]:
        amount, currency = self._amount(answer)  # an amount without a currency: value_currency null
        return {"value_number": amount, "value_currency": currency}

    def _amount(self, answer: str) -> tuple[float, str | None]:
        """(amount, ISO 4217 code or None) of the first amount in ``answer``. price-parser guesses the decimal
        separator from the digits; only a single separator followed by three digits (1,234 or 1.234) is
        ambiguous, and there the locale's decimal separator decides."""
        from babel.numbers import get_decimal_symbol, is_currency
        from price_parser import Price

        price = Price.fromstring(answer)
        if price.amount is None or price.amount_text is None:
            raise ValueError(f"no number in {answer!r}")
        separators = SEPARATOR.findall(price.amount_text)
        if len(separators) == 1 and re.search(r"[.,]\d{3}$", price.amount_text):
            price = Price.fromstring(answer, decimal_separator=get_decimal_symbol(self.locale))
        # A currency written against its amount ("45EUR", "$45") is the amount's own: spaced out for the check.
        spaced = answer.replace(price.currency, f" {price.currency} ", 1) if price.currency else answer
        own = [price.amount_text, *([price.currency] if price.currency else [])]
        self._check_surroundings(answer, own, "amount", spaced)
        amount = float(price.amount)
        start = answer.find(price.amount_text)
        before, after = answer[:start], answer[start + len(price.amount_text) :]
        # A sign written against the amount or its symbol (-45.10, -$45.10), or accounting's (45.10).
        signed = before.endswith(MINUS_SIGNS) or before[:-1].endswith(MINUS_SIGNS)
        if signed or (before.endswith("(") and after.startswith(")")):
            amount = -amount
        currency = price.currency
        if currency is None:
            return amount, None
        code = currency.upper() if is_currency(currency.upper()) else self.currency_codes.get(currency)
        if code is None:
            raise ValueError(f"unknown currency {currency!r} in {answer!r}")
        return amount, code

    def _date(self, question: QuestionTemplate, answer: str) -> dict[str, Any]:
        import dateparser
        from dateparser.search import search_dates

        settings = {"DATE_ORDER": self.date_order, "REQUIRE_PARTS": ["day", "month", "year"]}
        found: datetime.datetime | None = dateparser.parse(answer, languages=self.languages, settings=settings)
        if found is None:  # a date inside a sentence ("The invoice is dated 3 Nov 2025.")
            matches = search_dates(answer, languages=self.languages, settings=settings) or []
            if len(matches) > 1:
                raise ValueError(f"{len(matches)} dates in {answer!r}")
            if matches:
                self._check_surroundings(answer, [matches[0][0]], "date")
                found = matches[0][1]
        if found is None:
            raise ValueError(f"no date in {answer!r}")
        return {"value_date": found.date()}
