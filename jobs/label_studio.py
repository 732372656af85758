"""Label Studio both ways, for teams that already review there: the review queue exported as Label Studio
tasks (JSON task format: the page image, the answer as a ``textarea`` prediction, the evidence as a
``rectanglelabels`` region in percent of the image, the answer's confidence as the prediction's
``score``), and a Label Studio export (JSON) read back into the ``reviews`` table.

The task's ``data`` carries what the review speaks for (document, its version, page, question, item,
field, the answer under review), so an import needs nothing but the export file. The labeling config that
fits the tasks is written beside them (``LABEL_CONFIG``).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from jobs.review_server import PageImages
from jobs.reviews import LABEL_STUDIO_ORIGIN, QueueEntry, ReviewBook

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <Header value="$question"/>
  <TextArea name="answer" toName="image" editable="true" maxSubmissions="1" placeholder="the right answer"/>
  <RectangleLabels name="evidence" toName="image"><Label value="evidence" background="red"/></RectangleLabels>
  <Choices name="decision" toName="image" choice="single" showInline="true">
    <Choice value="accept"/><Choice value="correct"/><Choice value="reject"/>
  </Choices>
</View>
"""
ENTRY_FIELDS = ("document", "source_version", "page_number", "question_id", "item", "field", "answer", "confidence")


class LabelStudioError(ValueError):
    """An export file that is not a Label Studio export of docqa tasks."""


def task(entry: QueueEntry, png: bytes, number: int) -> dict[str, Any]:
    """One queue entry as a Label Studio task with its prediction."""
    result: list[dict[str, Any]] = [
        {
            "id": "answer",
            "from_name": "answer",
            "to_name": "image",
            "type": "textarea",
            "value": {"text": [entry.answer or ""]},
        },
    ]
    if entry.evidence_bbox:
        box = entry.evidence_bbox
        width, height = _png_size(png)
        result.append(
            {
                "id": "evidence",
                "from_name": "evidence",
                "to_name": "image",
                "type": "rectanglelabels",
                "original_width": width,
                "original_height": height,
                "image_rotation": 0,
                "value": {
                    "x": 100 * box["x0"],
                    "y": 100 * box["y0"],
                    "width": 100 * (box["x1"] - box["x0"]),
                    "height": 100 * (box["y1"] - box["y0"]),
                    "rotation": 0,
                    "rectanglelabels": ["evidence"],
                },
            }
        )
    data = {
        "image": "data:image/png;base64," + base64.b64encode(png).decode(),
        "question": entry.question or entry.question_id,
        "reason": entry.reason,
        "docqa_id": entry.id,
        "run_id": entry.run_id,
        "config_fingerprint": entry.config_fingerprint,
        **{name: getattr(entry, name) for name in ENTRY_FIELDS},
    }
    prediction = {"model_version": entry.run_id or "docqa", "score": entry.confidence or 0.0, "result": result}
    return {"id": number, "data": data, "predictions": [prediction]}


def _png_size(png: bytes) -> tuple[int, int]:
    """Width and height of a PNG (Pillow reads its header only)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.size


def export_tasks(book: ReviewBook, path: Path, limit: int | None = None) -> int:
    """The queue as Label Studio tasks in ``path`` (JSON), the labeling config beside it; the task count."""
    images = PageImages(book.storage)
    tasks = [
        task(entry, images.png(entry.document, entry.page_number, entry.source_version), number)
        for number, entry in enumerate(book.queue(limit), start=1)
    ]
    path.write_text(json.dumps(tasks, indent=1, default=str))
    path.with_suffix(".label-config.xml").write_text(LABEL_CONFIG)
    return len(tasks)


def _decision(annotation: dict[str, Any], reviewed: str | None) -> tuple[str, str | None]:
    """(decision, answer) of an annotation: its ``decision`` choice where given, else accept when its text
    is the answer under review, correct when it differs, reject when it is empty."""
    text, choice = None, None
    for result in annotation.get("result", []):
        value = result.get("value", {})
        if result.get("type") == "textarea" and value.get("text"):
            text = "\n".join(value["text"]).strip()
        if result.get("type") == "choices" and value.get("choices"):
            choice = value["choices"][0]
    if choice in ("accept", "reject"):
        return choice, None
    if choice == "correct" or (text and text != (reviewed or "")):
        if not text:
            raise LabelStudioError("a `correct` decision without the right answer in the text area")
        return "correct", text
    return ("accept", None) if text else ("reject", None)


def import_reviews(book: ReviewBook, path: Path) -> tuple[int, int]:
    """A Label Studio export (JSON) into ``reviews``: the latest completed annotation of each docqa task.
    Returns (reviews recorded, tasks skipped: no annotation, or not a docqa task of this output)."""
    try:
        tasks = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LabelStudioError(f"cannot read {path} as a Label Studio JSON export: {error}") from None
    if not isinstance(tasks, list):
        raise LabelStudioError(f"{path}: a Label Studio JSON export is a list of tasks")
    documents = set(book.store().reader("SELECT DISTINCT document FROM answers").read_all().column(0).to_pylist())
    recorded = skipped = 0
    for exported in tasks:
        data = exported.get("data", {}) if isinstance(exported, dict) else {}
        annotations = [a for a in exported.get("annotations", []) if not a.get("was_cancelled")] if data else []
        if not annotations or data.get("document") not in documents or "question_id" not in data:
            skipped += 1
            continue
        annotation = max(annotations, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
        entry = QueueEntry(
            id=str(data.get("docqa_id", "")),
            question=data.get("question"),
            value=None,
            value_status=None,
            reason="label studio",
            evidence_bbox=None,
            run_id=data.get("run_id"),
            config_fingerprint=data.get("config_fingerprint"),
            **{name: data.get(name) for name in ENTRY_FIELDS},
        )
        decision, answer = _decision(annotation, entry.answer)
        who = annotation.get("completed_by")
        reviewer = who.get("email") if isinstance(who, dict) else (str(who) if who is not None else None)
        book.decide(entry, decision, answer, reviewer, origin=LABEL_STUDIO_ORIGIN)
        recorded += 1
    return recorded, skipped
