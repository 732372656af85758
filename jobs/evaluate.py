"""``docqa evaluate``: how accurate an output's answers are, per question, against ground truth from the
reviews (accepted: the answer was right; corrected: the correction is the truth; rejected: it was wrong;
list and object answers from their reviewed fields) or from a file (CSV or JSON lines: ``document``,
optional ``page_number``, ``question_id``, ``answer``).

Per question: answers scored, ANLS (DocVQA's metric, threshold 0.5), exact match after normalization,
typed-value match (number, money with its currency, date, boolean, choice: the truth read by the question's
own parser), ANLS* for list and object answers (the ``anls-star`` package, which also gives plain ANLS for
strings), and accuracy against confidence: buckets, and the lowest confidence threshold at which the answers
above it reach ``target`` accuracy, with the share of answers it would send to review. An answer counts as
correct when its typed value matches (typed questions), its ANLS* is at least ``RECORDS_CORRECT`` (list and
object questions), or it matches exactly (text questions).
"""

from __future__ import annotations

import csv
import json
import math
import re
import unicodedata
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.query import AnswerStore, template_question
from jobs.views import LATEST_REVIEWS_SQL
from pipeline.config import StorageConfig
from pipeline.questions import QuestionTemplate
from pipeline.values import ValueParser

RECORDS_CORRECT = 0.9
BUCKETS = 10  # confidence buckets of width 0.1
TYPED_COLUMNS = ("value_number", "value_currency", "value_date", "value_boolean")


class TruthError(ValueError):
    """A truth file that cannot be read, or names nothing of the output."""


@dataclass
class Scored:
    """One answer against its truth."""

    document: str
    page_number: int | None
    question_id: str
    answer: str | None
    truth: str | None
    confidence: float | None
    anls: float
    exact: bool
    typed_match: bool | None  # None: not a typed question
    correct: bool


@dataclass
class QuestionScore:
    question_id: str
    type: str
    answers: int
    anls: float
    exact_match: float
    typed_match: float | None
    accuracy: float
    threshold: float | None  # the lowest confidence reaching the target on the answers at or above it
    sent_to_review: float | None  # the share of answers under that threshold
    buckets: list[dict[str, Any]] = field(default_factory=list)


def normalized(text: str | None) -> str:
    """Casefolded, accents and punctuation at the edges dropped, whitespace collapsed: "Total: $45.10." and
    "total: $45.10" are the same answer."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    text = re.sub(r"\s+", " ", text).strip()
    return text.strip(" .,;:!?\"'()[]")


def anls(truth: Any, answer: Any) -> float:
    """ANLS for strings, ANLS* for records (lists and objects), by anls-star."""
    from anls_star import anls_score

    if truth is None or answer is None:
        return float(truth == answer)
    return float(anls_score(truth, answer))


def read_truth(path: Path) -> list[dict[str, Any]]:
    """A truth file's rows: CSV with a header, or JSON lines; ``document``, ``question_id`` and ``answer``
    required, ``page_number`` optional (without it: the document's answer, as docqa table reduces it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TruthError(f"cannot read {path}: {error.strerror}") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise TruthError(f"{path}: not JSON lines ({error.msg}, line {error.lineno})") from None
    for number, row in enumerate(rows, start=1):
        missing = [key for key in ("document", "question_id", "answer") if key not in row]
        if missing:
            raise TruthError(f"{path}, row {number}: no {', '.join(missing)}")
        page = row.get("page_number")
        row["page_number"] = int(page) if page not in (None, "") else None
    return rows


class Evaluation:
    """The scored answers of an output against a truth, and each question's figures."""

    def __init__(self, output: str, storage: StorageConfig | None = None) -> None:
        self.store = AnswerStore(output, storage=storage)
        self.templates = self.store.question_templates()
        self.parser = ValueParser(self.store.values_config())

    def question(self, question_id: str) -> QuestionTemplate:
        return template_question(self.templates, question_id)

    def from_reviews(self) -> list[Scored]:
        """Each reviewed answer (the latest decision per answer) scored against what the reviewer decided;
        list and object answers from their reviewed fields (``_from_field_reviews``)."""
        rows = self.store.reader(
            "SELECT r.document, r.page_number, r.question_id, r.decision, r.answer AS decided,"
            " r.reviewed_answer, r.reviewed_confidence FROM (" + LATEST_REVIEWS_SQL + ") r WHERE r.item IS NULL"
        ).read_all()
        scored = []
        for row in rows.to_pylist():
            truth = row["decided"] if row["decision"] != "rejected" else None
            scored.append(
                self.score(
                    row["document"],
                    row["page_number"],
                    row["question_id"],
                    row["reviewed_answer"],
                    truth,
                    row["reviewed_confidence"],
                    rejected=row["decision"] == "rejected",
                )
            )
        return scored + self._from_field_reviews()

    def _from_field_reviews(self) -> list[Scored]:
        """Each list or object answer with a reviewed field, scored (ANLS*) against its records as reviewed:
        accepted fields as they are, corrected ones corrected, rejected ones null, and the fields nobody
        reviewed as the model wrote them (taken to be right)."""
        rows = self.store.reader(
            "SELECT i.document, i.page_number, i.question_id, i.item, i.field, i.answer AS model,"
            " r.answer AS decided, a.confidence FROM items i"
            " JOIN reviewed_items r USING (document, page_number, question_id, item, field)"
            " JOIN answers a USING (document, page_number, question_id)"
            " JOIN (SELECT DISTINCT document, page_number, question_id FROM reviewed_items"
            " WHERE review IS NOT NULL) USING (document, page_number, question_id)"
            " ORDER BY document, page_number, question_id, item, field"
        ).read_all()
        answers: dict[tuple[str, int, str], dict[str, Any]] = {}
        for row in rows.to_pylist():
            key = (row["document"], row["page_number"], row["question_id"])
            answer = answers.setdefault(key, {"model": {}, "truth": {}, "confidence": row["confidence"]})
            answer["model"].setdefault(row["item"], {})[row["field"]] = row["model"]
            answer["truth"].setdefault(row["item"], {})[row["field"]] = row["decided"]
        scored = []
        for (document, page, question_id), answer in answers.items():
            many = self.question(question_id).type == "list"
            model, truth = (
                [records[item] for item in sorted(records)] if many else records[min(records)]
                for records in (answer["model"], answer["truth"])
            )
            scored.append(
                self.score(document, page, question_id, json.dumps(model), json.dumps(truth), answer["confidence"])
            )
        return scored

    def from_file(self, path: Path) -> list[Scored]:
        """Each row of the truth file scored against the output's answer it names."""
        answers = (
            self.store.reader(
                "SELECT document, page_number, question_id, answer, confidence FROM answers"
                " WHERE status = 'ok' AND question_id IS NOT NULL"
            )
            .read_all()
            .to_pylist()
        )
        by_page = {(row["document"], row["page_number"], row["question_id"]): row for row in answers}
        documents = sorted({row["document"] for row in answers})
        documents_sql = self.store.documents_sql(reviewed=False)  # the model's answers, not the reviewers'
        table = {row["document"]: row for row in self.store.reader(documents_sql).read_all().to_pylist()}
        scored, unknown = [], []
        for truth in read_truth(path):
            document = _matching(truth["document"], documents)
            if document is None:
                unknown.append(truth["document"])
                continue
            qid = truth["question_id"]
            if truth["page_number"] is not None:
                row = by_page.get((document, truth["page_number"], qid), {})
                answer, confidence = row.get("answer"), row.get("confidence")
            else:
                answer, confidence = table.get(document, {}).get(qid), None
                page = table.get(document, {}).get(f"{qid}_page")
                row = by_page.get((document, page, qid), {})
                confidence = row.get("confidence")
            expected = truth["answer"] if isinstance(truth["answer"], str) else json.dumps(truth["answer"])
            scored.append(self.score(document, truth["page_number"], qid, answer, expected, confidence))
        if unknown and not scored:
            raise TruthError(f"no document of the truth file is in the output (e.g. {unknown[0]!r})")
        return scored

    def score(
        self,
        document: str,
        page: int | None,
        question_id: str,
        answer: str | None,
        truth: str | None,
        confidence: float | None,
        rejected: bool = False,
    ) -> Scored:
        question = self.question(question_id)
        typed_match = None
        if rejected:
            similarity, exact, typed_match = 0.0, False, (False if question.type not in ("text",) else None)
        elif question.has_records:
            similarity = anls(_json_or_text(truth), _json_or_text(answer))
            exact = normalized(answer) == normalized(truth)
        else:
            similarity, exact = anls(truth, answer), normalized(answer) == normalized(truth)
            if question.type != "text":
                typed_match = self.same_value(question, truth, answer)
        if question.has_records:
            correct = similarity >= RECORDS_CORRECT
        else:
            correct = typed_match if typed_match is not None else exact
        return Scored(document, page, question_id, answer, truth, confidence, similarity, exact, typed_match, correct)

    def same_value(self, question: QuestionTemplate, truth: str | None, answer: str | None) -> bool:
        """Whether the answer's typed value is the truth's, both read by the question's parser."""
        expected, got = self.parser.parse(question, truth), self.parser.parse(question, answer)
        if expected.get("value_status") != "parsed" or got.get("value_status") != "parsed":
            return normalized(answer) == normalized(truth) and expected.get("value_status") != "unparsed"
        if question.type == "choice":
            return expected.get("answer") == got.get("answer")
        for column in TYPED_COLUMNS:
            left, right = expected.get(column), got.get(column)
            if isinstance(left, float) and isinstance(right, float):
                if not math.isclose(left, right, rel_tol=1e-9, abs_tol=1e-9):
                    return False
            elif left != right:
                return False
        return True


def _json_or_text(text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return text


def _matching(name: str, documents: list[str]) -> str | None:
    """The output's document a truth row names: the same URI, or the one document ending with its name."""
    if name in documents:
        return name
    ending = [document for document in documents if document.endswith("/" + name.lstrip("/"))]
    return ending[0] if len(ending) == 1 else None


def threshold_for(scored: list[Scored], target: float) -> tuple[float | None, float | None]:
    """The lowest confidence t such that the answers with confidence >= t are at least ``target`` accurate,
    and the share of answers under t (sent to review). Answers without a confidence (text-layer answers)
    take no part. (None, None) when no answer has a confidence; (None, 1.0) when no threshold reaches it."""
    rated = sorted((s for s in scored if s.confidence is not None), key=lambda s: -s.confidence)
    if not rated:
        return None, None
    best, correct = None, 0
    for count, answer in enumerate(rated, start=1):
        correct += answer.correct
        last_of_its_value = count == len(rated) or rated[count].confidence != answer.confidence
        if last_of_its_value and correct / count >= target:
            best = (answer.confidence, 1 - count / len(rated))
    return best if best is not None else (None, 1.0)


def buckets(scored: list[Scored]) -> list[dict[str, Any]]:
    """Answers and accuracy per confidence bucket of width 1/BUCKETS."""
    counts: dict[int, list[bool]] = defaultdict(list)
    for answer in scored:
        if answer.confidence is not None:
            counts[min(int(answer.confidence * BUCKETS), BUCKETS - 1)].append(answer.correct)
    return [
        {
            "from": index / BUCKETS,
            "to": (index + 1) / BUCKETS,
            "answers": len(counts[index]),
            "accuracy": (sum(counts[index]) / len(counts[index])) if counts[index] else None,
        }
        for index in range(BUCKETS)
    ]


def summarize(evaluation: Evaluation, scored: list[Scored], target: float) -> list[QuestionScore]:
    by_question: dict[str, list[Scored]] = defaultdict(list)
    for answer in scored:
        by_question[answer.question_id].append(answer)
    figures = []
    for question_id in sorted(by_question):
        answers = by_question[question_id]
        typed = [answer.typed_match for answer in answers if answer.typed_match is not None]
        threshold, share = threshold_for(answers, target)
        figures.append(
            QuestionScore(
                question_id=question_id,
                type=evaluation.question(question_id).type,
                answers=len(answers),
                anls=sum(answer.anls for answer in answers) / len(answers),
                exact_match=sum(answer.exact for answer in answers) / len(answers),
                typed_match=(sum(typed) / len(typed)) if typed else None,
                accuracy=sum(answer.correct for answer in answers) / len(answers),
                threshold=threshold,
                sent_to_review=share,
                buckets=buckets(answers),
            )
        )
    return figures


def as_rows(figures: list[QuestionScore]) -> list[dict[str, Any]]:
    """The figures as flat rows (buckets as JSON), for a table, JSON or a Delta table."""
    return [{**asdict(figure), "buckets": json.dumps(figure.buckets)} for figure in figures]


def plot(figures: list[QuestionScore], target: float, path: Path) -> None:
    """One panel per question: answers per confidence bucket (bars) and their accuracy (line), the target
    and the suggested threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, max(len(figures), 1))
    rows = math.ceil(max(len(figures), 1) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for axis in axes.flat[len(figures) :]:
        axis.set_visible(False)
    for axis, score in zip(axes.flat, figures, strict=False):
        centres = [(bucket["from"] + bucket["to"]) / 2 for bucket in score.buckets]
        volume = axis.twinx()
        volume.bar(centres, [bucket["answers"] for bucket in score.buckets], width=0.09, color="#cfd8dc")
        volume.set_ylabel("answers")
        axis.set_zorder(volume.get_zorder() + 1)
        axis.patch.set_visible(False)
        points = [(c, b["accuracy"]) for c, b in zip(centres, score.buckets, strict=True) if b["accuracy"] is not None]
        axis.plot([p[0] for p in points], [p[1] for p in points], "o-", color="#1565c0", label="accuracy")
        axis.axhline(target, color="#2e7d32", linestyle=":", label=f"target {target:g}")
        if score.threshold is not None:
            axis.axvline(score.threshold, color="#c62828", label=f"threshold {score.threshold:.2f}")
        axis.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence", ylabel="accuracy")
        axis.set_title(f"{score.question_id}: {score.answers} answers, accuracy {score.accuracy:.2f}", fontsize=9)
        axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
