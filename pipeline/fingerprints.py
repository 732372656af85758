"""Digests of a config: its fingerprint (what the answers depend on: a document is processed again when it
changes) and the digests of the settings that decide a final status (a document with that status is taken
again when its setting changes). Recorded in every run and in every answer row."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.config import JobConfig
from pipeline.formats import SUPPORTED_FORMATS
from pipeline.questions import QuestionTemplate
from pipeline.records import Status

# Model settings that change how fast answers come, not what they are: left out of the fingerprint.
SPEED_ONLY_MODEL_FIELDS = {"prefix_cache", "continuous_batching", "decode_slots", "cuda_graphs"}


def config_fingerprint(config: JobConfig) -> str:
    """What the answers depend on (questions, model, rendering): a document is processed again when it
    changes. Limits, actors, storage, budgets and the model's speed settings (the same answers, faster)
    do not change answers and are left out."""
    relevant = {
        "questions": [question_fingerprint(question) for question in config.questions],
        "model": config.model.model_dump(mode="json", exclude=SPEED_ONLY_MODEL_FIELDS),
        "render": {"backend": config.render.backend, "image_splitting": config.render.image_splitting},
    }
    # Sections added with typed answers count only where they matter, so that an upgrade does not take
    # every document of an unchanged config again.
    if any(question.type in ("number", "money", "date") for question in config.questions):
        relevant["values"] = config.values.model_dump(mode="json")
    if any(question.source == "auto" for question in config.questions):
        relevant["text_layer"] = config.text_layer.model_dump(mode="json")
    return _digest(relevant)


# The salt of the digests of runs recorded before each output had a salt of its own (their records say no
# ``digest_salt``): kept to compare with them, never used for a new record.
LEGACY_SALT = b"docqa render.passwords"


def setting_digests(config: JobConfig, salt: bytes) -> dict[str, str]:
    """Per final status that a setting decides, a digest of that setting. A document that got the status
    is taken again once the digest differs from the one recorded by the run that gave it (a password
    added, a limit raised). Passwords go through PBKDF2 with ``salt``, the output's own random salt
    (pipeline/tables.py ``OutputTables.digest_salt``), so that the run record holds nothing that gives them
    back cheaply, nor the same digest as another output's for the same password."""
    limits = config.limits
    passwords = json.dumps(list(config.render.password_values())).encode()
    settings = {
        Status.ENCRYPTED: hashlib.pbkdf2_hmac("sha256", passwords, salt, 100_000).hex(),
        Status.TOO_MANY_PAGES: limits.max_pages_per_document,
        Status.FILE_TOO_LARGE: limits.max_file_bytes,
        Status.PAGE_TOO_LARGE: [limits.max_pixels_per_page, limits.max_aspect_ratio],
        Status.TIMEOUT: limits.document_timeout_s,
        Status.MEMORY_LIMIT: limits.render_memory_mb,
        Status.UNSUPPORTED_FORMAT: SUPPORTED_FORMATS,  # a later version that reads more formats takes them
    }
    digests = {status.value: _digest(value) for status, value in settings.items()}
    return digests | {OCR_SETTING: ocr_digest(config)}


# Not a status: the OCR settings, which decide the words of the pages without a usable text layer
# (jobs/incremental.py takes those pages' documents again when they change).
OCR_SETTING = "ocr"


def ocr_digest(config: JobConfig) -> str:
    """The OCR's settings as they decide a page's words: none at all when OCR is off (a run recorded before
    OCR existed had none either)."""
    ocr = config.ocr
    return _digest(None if ocr.engine == "none" else ocr.model_dump(mode="json"))


# Question fields added with typed answers and with records: in a fingerprint only when set (see
# config_fingerprint), so that the fingerprints of questions written before them do not change.
TYPED_ANSWER_FIELDS = ("type", "choices", "constrained", "source", "fields", "max_items")


def question_fingerprint(question: QuestionTemplate) -> dict[str, Any]:
    """What of a question its answers depend on: all but ``reduce`` (read at query time), the typed-answer
    fields only when they differ from their defaults."""
    dumped = question.model_dump(mode="json", exclude={"reduce"})
    for name in TYPED_ANSWER_FIELDS:
        if dumped[name] == QuestionTemplate.model_fields[name].default:
            del dumped[name]
    return dumped


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
