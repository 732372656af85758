"""The job config: one validated model, loaded from YAML and overridable field by field from the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.pages import PageRange, parse_page_selection, selection_contains
from pipeline.rows import Status

DEFAULT_MODEL_ID = "HuggingFaceM4/idefics2-8b"
TEMPLATE_VARIABLES = ("file_name", "page_number", "num_pages")
# Model settings that change how fast answers come, not what they are: left out of the fingerprint.
SPEED_ONLY_MODEL_FIELDS = {"prefix_cache", "continuous_batching", "decode_slots", "cuda_graphs"}


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


class ConfigError(ValueError):
    """An invalid job config; the message names each bad field and what is wrong with it."""


def _check_bounds(section: BaseModel, low: str, high: str) -> None:
    if getattr(section, high) < getattr(section, low):
        raise ValueError(f"{high} ({getattr(section, high)}) is below {low} ({getattr(section, low)})")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuestionTemplate(_Strict):
    """One question asked of every page it applies to."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Alias of the question; a column name in tables.")
    text: str = Field(min_length=1, description="Question, may use {file_name}, {page_number}, {num_pages}.")
    pages: str | int | list[str | int] = Field("all", description='all, first, last, or ranges such as "1-3,-1".')
    max_new_tokens: int = Field(64, ge=1, le=8192, description="Most tokens of one answer.")
    type: Literal["text", "number", "money", "date", "boolean", "choice"] = Field(
        "text",
        description="What the answer is: text (as generated), number, money (amount and ISO 4217 currency), "
        "date, boolean (yes/no), or choice (one of `choices`). Typed answers are parsed into the value_* columns.",
    )
    choices: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="With type choice: the allowed answers (at least two, distinct)."
    )
    constrained: bool | None = Field(
        None,
        description="Decode only answers of the type's form (a grammar masks the other tokens): always on for "
        "choice and boolean; number, money and date may opt in; null: on for choice and boolean.",
    )
    source: Literal["model", "text_layer", "auto"] = Field(
        "model",
        description="Where the answer comes from: the model; the page's own text layer (type text only); or "
        "auto: the text layer when the page has a usable one (see README), else the model.",
    )
    reduce: Literal["first", "last", "max_confidence", "all"] = Field(
        "first",
        description="The document-level answer (`docqa table`, the `documents` view): the first or last page's "
        "answer, the most confident one, or all of them in page order.",
    )

    @field_validator("text")
    @classmethod
    def _known_variables(cls, text: str) -> str:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
        except ValueError as error:
            raise ValueError(f"malformed template ({error}); write literal braces as {{{{ and }}}}") from None
        unknown = sorted({name for name in names if name not in TEMPLATE_VARIABLES})
        if unknown:
            raise ValueError(f"unknown template variable(s) {unknown}; known: {list(TEMPLATE_VARIABLES)}")
        return text

    @field_validator("pages")
    @classmethod
    def _valid_pages(cls, pages: str | int | list[str | int]) -> str | int | list[str | int]:
        parse_page_selection(pages)
        return pages

    @model_validator(mode="after")
    def _consistent_type(self) -> QuestionTemplate:
        if self.type == "choice":
            if not self.choices or len(self.choices) < 2:
                raise ValueError("type choice needs `choices`: at least two allowed answers")
            if len(set(self.choices)) < len(self.choices):
                raise ValueError(f"choices must be distinct: {self.choices}")
        elif self.choices is not None:
            raise ValueError(f"`choices` is for type choice, not type {self.type}")
        if self.constrained is False and self.type in ("choice", "boolean"):
            raise ValueError(f"type {self.type} is always constrained; leave `constrained` out")
        if self.constrained and self.type == "text":
            raise ValueError("type text has no form to constrain; set a type, or leave `constrained` out")
        if self.source != "model" and self.type != "text":
            raise ValueError(f"source {self.source} gives the page's text: type must be text, not {self.type}")
        return self

    def answered_by_model(self, text_usable: bool) -> bool:
        """Whether the model answers this question on a page whose text layer is (or is not) usable."""
        return self.source == "model" or (self.source == "auto" and not text_usable)

    @property
    def allowed_answers(self) -> list[str] | None:
        """The only answers a choice or boolean question can have."""
        return BOOLEAN_ANSWERS if self.type == "boolean" else self.choices

    @property
    def constraint(self) -> tuple[str, str] | None:
        """The grammar answers are decoded under, as (``ebnf`` or ``regex``, its text), or None."""
        allowed = self.allowed_answers
        if allowed is not None:  # as written or capitalized; EBNF string literals take JSON's escapes
            spellings = dict.fromkeys(form for answer in allowed for form in (answer, answer[:1].upper() + answer[1:]))
            literals = " | ".join(json.dumps(spelling, ensure_ascii=False) for spelling in spellings)
            return "ebnf", f'root ::= " "? ({literals})'
        if self.constrained:
            return "regex", f" ?({CONSTRAINED_FORMS[self.type]})"
        return None

    @property
    def answer_tokens(self) -> int:
        """Most tokens an answer may take: ``max_new_tokens``, raised for a choice so that the longest allowed
        answer fits however it is tokenized (at most a token per byte) with a leading space and its stop token."""
        allowed = self.allowed_answers
        if allowed is None:
            return self.max_new_tokens
        return max(self.max_new_tokens, max(len(answer.encode()) for answer in allowed) + 2)

    @property
    def page_ranges(self) -> tuple[PageRange, ...]:
        return parse_page_selection(self.pages)

    def applies_to(self, page_number: int, num_pages: int) -> bool:
        return selection_contains(self.page_ranges, page_number, num_pages)

    def question(self, file_name: str, page_number: int, num_pages: int) -> str:
        """The question text with its variables filled in."""
        return self.text.format(file_name=file_name, page_number=page_number, num_pages=num_pages)


class ModelConfig(_Strict):
    """The checkpoint and how to load and prompt it; `docqa models` lists the supported families."""

    id: str = Field(DEFAULT_MODEL_ID, min_length=1, description="Hub id or local checkpoint directory.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of model.id.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights' dtype; auto: bfloat16 on a CUDA GPU, float32 on CPU."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="auto: flash_attention_2 on a CUDA GPU in bf16/fp16 when flash-attn is installed, else sdpa.",
    )
    prompt_format: Literal["auto", "chat", "raw"] = Field(
        "auto",
        description="chat: the instruct turn; raw: image then 'Question: … Answer:' (base checkpoints); auto: "
        "the known checkpoint's format, else chat when the processor has a chat template, else raw.",
    )
    stop_at_newline: bool | None = Field(None, description="End answers at the first newline; null: on for raw.")
    adapter: str | None = Field(None, description="PEFT (LoRA/QLoRA) adapter, Hub id or directory, applied on id.")
    adapter_revision: str | None = Field(None, description="Hub revision of model.adapter.")
    quantization: Literal["none", "bnb-4bit", "awq"] = Field(
        "none", description="bnb-4bit: nf4 + double quantization, fp16 compute; awq: an AWQ checkpoint. GPU only."
    )
    prefix_cache: bool = Field(
        True,
        description="Read the prompt prefix that every question about a page shares (its image tokens) once per "
        "page and reuse its KV cache for each question (Idefics2; Idefics1 has no image tokens to share).",
    )
    continuous_batching: bool = Field(
        True,
        description="Decode every question of a batch together, each to its own length, refilling the place of "
        "a finished answer from those waiting (Idefics2); false: transformers' generate per group of questions "
        "with the same max_new_tokens, each group running until its longest answer ends.",
    )
    decode_slots: int | None = Field(
        None,
        ge=1,
        description="With continuous batching: most answers decoded at once; null: as many as fit in 60% of the "
        "free GPU memory (at most 256), 64 on a CPU.",
    )
    cuda_graphs: bool = Field(
        True,
        description="With continuous batching on a CUDA GPU: capture the decoding step once as a CUDA graph and "
        "replay it (one launch per step instead of thousands).",
    )

    @field_validator("id", "adapter")
    @classmethod
    def _expand_home(cls, location: str | None) -> str | None:
        """transformers never expands ``~``: a home-relative checkpoint directory would be taken for a Hub id."""
        return os.path.expanduser(location) if location and location.startswith("~") else location


class RenderConfig(_Strict):
    backend: Literal["pymupdf", "pdf2image"] = Field(
        "pymupdf", description="Rasterizer: PyMuPDF, or poppler through pdf2image (the text layer is PyMuPDF's)."
    )
    image_splitting: bool | None = Field(None, description="4 crops + the whole page; null keeps the checkpoint's.")
    passwords: list[SecretStr] = Field(
        default_factory=list, description="Tried in turn on encrypted PDFs; never logged or written out."
    )
    task_memory_mb: int = Field(
        1024, ge=64, description="Memory Ray reserves per read/render/split task; bounds concurrent renders per node."
    )
    range_pages: int = Field(
        64,
        ge=1,
        description="A document with more pages to answer than this is rendered in page ranges of this many, each "
        "by its own task (in parallel, each under limits.document_timeout_s and limits.render_memory_mb).",
    )
    block_mb: int = Field(
        32,
        ge=1,
        description="Byte budget of a block of rendered pages handed from the CPU stages to the model: pages move on "
        "as they are rendered, in blocks of at most this size (a page larger than the budget is a block alone).",
    )


class LimitsConfig(_Strict):
    max_pages_per_document: int = Field(
        2000, ge=1, description="A document with more pages is too_many_pages (unless its questions name pages)."
    )
    max_pixels_per_page: int = Field(16_000_000, ge=1, description="A page that would render larger is page_too_large.")
    max_file_bytes: int = Field(256 * 1024 * 1024, ge=1, description="A larger file is file_too_large, never read.")
    max_aspect_ratio: float = Field(20.0, ge=1, description="Longest over shortest page side.")
    document_timeout_s: float = Field(120.0, gt=0, description="Wall-clock limit to open and render a document.")
    render_memory_mb: int = Field(2048, ge=256, description="Address-space cap of the rendering process.")
    stall_timeout_s: float = Field(
        900.0,
        gt=0,
        description="The run stops (exit 1, saying what is pending) when no result row arrives for this long. "
        "Sized for the slowest legitimate wait: a model actor loading 8B weights and answering a batch of long "
        "transcriptions on a busy GPU takes minutes, not 15.",
    )
    max_failed_page_share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="A run whose share of pages with a retryable failure (model_error, read_error) is above this "
        "commits what it has but is degraded: exit code 3. Bad input (corrupt, not_pdf, ...) never counts.",
    )


class ValuesConfig(_Strict):
    """How typed answers are read (pipeline/values.py)."""

    locale: str = Field(
        "en_US",
        description="Locale of the documents (babel's names: en_US, de_DE, fr_FR, ...): the language of month "
        "names, the decimal separator of an ambiguous amount (1,234), the currency a bare symbol ($) means.",
    )
    day_first: bool | None = Field(
        None, description="03/11/2025 is 3 November (true) or March 11 (false); null: the locale's date order."
    )

    @field_validator("locale")
    @classmethod
    def _known_locale(cls, locale: str) -> str:
        from babel import Locale, UnknownLocaleError

        try:
            Locale.parse(locale)
        except (UnknownLocaleError, ValueError) as error:
            raise ValueError(f"unknown locale {locale!r} ({error}); use a name such as en_US or de_DE") from None
        return locale


class TextLayerConfig(_Strict):
    """When a page's own text layer is usable as an answer (questions with ``source: auto``)."""

    min_chars: int = Field(50, ge=1, description="Fewest non-space characters of a usable text layer.")
    min_readable_share: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Least share of its non-space characters that are letters, digits or common punctuation "
        "(not U+FFFD, private-use or control characters: what a font without a Unicode map extracts to).",
    )


class ActorPoolConfig(_Strict):
    """The model actor pool (Ray Data's autoscaling actor pool in a run, a Serve deployment in `docqa serve`)."""

    min_actors: int = Field(
        1,
        ge=1,
        description="Actors a run starts with (in `docqa serve`: the fewest replicas). A run's pool may shrink "
        "below it, down to one: Ray Data's autoscaler lets an idle actor go, which is also how the pool gives "
        "CPUs back to the read/render tasks when a lost node leaves too few for both.",
    )
    max_actors: int = Field(
        1, ge=1, description="Most actors; Ray Data adds actors up to this while pages queue for the model."
    )
    num_gpus_per_actor: float = Field(0.0, ge=0, description="GPUs each actor reserves (0 on CPU clusters).")
    num_cpus_per_actor: float = Field(
        1.0, gt=0, description="CPUs each actor reserves; the pool at its largest must leave one for rendering."
    )
    batch_size: int = Field(4, ge=1, description="Pages per actor call; all their questions are answered together.")

    @model_validator(mode="after")
    def _bounds(self) -> ActorPoolConfig:
        _check_bounds(self, "min_actors", "max_actors")
        return self


class StorageConfig(_Strict):
    """Object storage client settings (S3 and S3-compatible stores). Credentials come from the standard AWS
    chain (environment, profile, instance role), never from this file."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; default AWS_ENDPOINT_URL or AWS.")
    region: str | None = Field(None, description="S3 region; default AWS_REGION or AWS_DEFAULT_REGION.")
    max_attempts: int = Field(10, ge=1, le=50, description="Per request, standard retry mode (throttling, 5xx).")
    connect_timeout_s: float = Field(10.0, gt=0, description="Per connection attempt to object storage.")
    read_timeout_s: float = Field(60.0, gt=0, description="Per read from object storage.")
    max_pool_connections: int = Field(32, ge=1, description="Open connections to object storage per process.")


class BudgetConfig(_Strict):
    """Caps for one run over a large backlog; what is left is reported and picked up by the next run."""

    max_documents: int | None = Field(None, ge=1, description="New or changed documents taken per run.")
    max_pages: int | None = Field(None, ge=1, description="Pages rendered per run (whole documents only).")


# Columns of the documents view (`docqa table`) beside each question's own, ID_value, ID_currency, ID_page.
DOCUMENT_COLUMNS = ("document", "num_pages", "status")
DERIVED_SUFFIXES = ("_value", "_currency", "_page")


def check_unique_ids(questions: list[QuestionTemplate]) -> list[QuestionTemplate]:
    ids = [question.id for question in questions]
    duplicates = sorted({qid for qid in ids if ids.count(qid) > 1})
    if duplicates:
        raise ValueError(f"question ids must be unique; repeated: {duplicates}")
    taken = {*DOCUMENT_COLUMNS, *(qid + suffix for qid in ids for suffix in DERIVED_SUFFIXES)}
    clashing = sorted(set(ids) & taken)
    if clashing:
        raise ValueError(
            f"question ids {clashing} clash with columns of the documents view (document, num_pages, status, and "
            "per question ID: ID_value, ID_currency, ID_page)"
        )
    return questions


QuestionList = Annotated[list[QuestionTemplate], Field(min_length=1), AfterValidator(check_unique_ids)]


class ServeConfig(_Strict):
    """The online endpoint (`docqa serve`). The model replicas use `model`, `render` and `limits` as the
    batch pipeline does; `actors.batch_size` is the most pages one model call takes."""

    host: str = Field("127.0.0.1", description="Address the endpoint listens on (0.0.0.0: every interface).")
    port: int = Field(8000, ge=1, le=65535, description="Port the endpoint listens on.")
    token: SecretStr | None = Field(None, description="Bearer token; DOCQA_SERVE_TOKEN in the environment wins.")
    min_replicas: int = Field(1, ge=1, description="Model replicas kept running.")
    max_replicas: int = Field(1, ge=1, description="Model replicas Serve may scale up to under load.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Pages in flight per model replica to aim at.")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="How long a model call waits to fill its batch.")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest PDF accepted (413 above).")
    max_pages: int = Field(20, ge=1, description="Most pages of one uploaded document (413 above).")
    max_questions: int = Field(16, ge=1, description="Most questions in one request (422 above).")
    question_sets: dict[str, QuestionList] = Field(
        default_factory=dict, description="Named question templates a request can pick with question_set=NAME."
    )

    @model_validator(mode="after")
    def _bounds(self) -> ServeConfig:
        _check_bounds(self, "min_replicas", "max_replicas")
        return self


class JobConfig(_Strict):
    input: str | None = Field(
        None,
        min_length=1,
        description="Folder, file, glob, s3:// prefix or glob, or a .txt list of URIs. Required by `docqa run`, "
        "`nightly` and `submit`; `docqa serve` reads none.",
    )
    output: str | None = Field(
        None,
        min_length=1,
        description="Folder or s3:// prefix holding the Delta tables answers, current and runs. Required by "
        "`docqa run`, `nightly` and `submit`; `docqa serve` writes none.",
    )
    commit_rows: int = Field(
        50_000, ge=1, description="A Delta commit is made once this many rows of complete documents wait."
    )
    commit_interval_s: float = Field(
        60.0, gt=0, description="...or once this long has passed since the last commit: what a crash can lose."
    )
    lease_s: float = Field(
        300.0,
        ge=1,
        description="While a run lives, its driver renews a lease on it in the `runs` table every lease_s / 5 "
        "seconds. The next run on the output marks a `running` run whose lease has passed `abandoned` and brings "
        "`current` up to date with what it committed; `docqa optimize` does not vacuum while a run holds its lease.",
    )
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Default: a new id from the time. A run id an earlier attempt started resumes it.",
    )
    reprocess: Literal["failed", "all"] | None = Field(
        None,
        description="Take documents again that a plain run skips: `failed` (any row not ok) or `all`. Default: "
        "only new or changed documents, retryable failures, and failures decided by a setting changed since.",
    )
    questions: QuestionList = Field(description="The question templates, asked of every page they apply to.")
    model: ModelConfig = Field(ModelConfig(), description="The checkpoint and how it is loaded.")
    render: RenderConfig = Field(RenderConfig(), description="Rasterizing and splitting pages.")
    limits: LimitsConfig = Field(LimitsConfig(), description="What a document or a run may cost before it is refused.")
    actors: ActorPoolConfig = Field(ActorPoolConfig(), description="The model actor pool.")
    storage: StorageConfig = Field(StorageConfig(), description="Object storage client settings.")
    budget: BudgetConfig = Field(BudgetConfig(), description="Caps on what one run takes on.")
    serve: ServeConfig = Field(ServeConfig(), description="The online endpoint (`docqa serve`).")
    values: ValuesConfig = Field(ValuesConfig(), description="Reading typed values (numbers, amounts, dates).")
    text_layer: TextLayerConfig = Field(TextLayerConfig(), description="When a page's text layer answers.")

    @field_validator("input", "output")
    @classmethod
    def _absolute_local_path(cls, location: str | None) -> str | None:
        """A local path is made absolute against the working directory where the config is loaded: run
        records then say where the files were, and a submitted job reads the same folder on the cluster."""
        if location is None or "://" in location:
            return location
        return os.path.abspath(os.path.expanduser(location))

    @model_validator(mode="after")
    def _quantization_needs_gpu(self) -> JobConfig:
        if self.model.quantization != "none" and self.actors.num_gpus_per_actor == 0:
            raise ValueError(
                f"model.quantization={self.model.quantization} runs on CUDA GPUs only; set "
                "actors.num_gpus_per_actor (e.g. 1) on a cluster with GPUs, or model.quantization=none"
            )
        return self

    def questions_for_page(self, page_number: int, num_pages: int) -> list[QuestionTemplate]:
        return [question for question in self.questions if question.applies_to(page_number, num_pages)]

    def fingerprint(self) -> str:
        """What the answers depend on (questions, model, rendering): a document is processed again when it
        changes. Limits, actors, storage, budgets and the model's speed settings (the same answers, faster)
        do not change answers and are left out."""
        relevant = {
            "questions": [question_fingerprint(question) for question in self.questions],
            "model": self.model.model_dump(mode="json", exclude=SPEED_ONLY_MODEL_FIELDS),
            "render": {"backend": self.render.backend, "image_splitting": self.render.image_splitting},
        }
        # Sections added with typed answers count only where they matter, so that an upgrade does not take
        # every document of an unchanged config again.
        if any(question.type in ("number", "money", "date") for question in self.questions):
            relevant["values"] = self.values.model_dump(mode="json")
        if any(question.source == "auto" for question in self.questions):
            relevant["text_layer"] = self.text_layer.model_dump(mode="json")
        return _digest(relevant)

    def setting_digests(self) -> dict[str, str]:
        """Per final status that a setting decides, a digest of that setting. A document that got the status
        is taken again once the digest differs from the one recorded by the run that gave it (a password
        added, a limit raised). Passwords go through PBKDF2 so that the run record holds nothing that gives
        them back cheaply."""
        limits = self.limits
        passwords = json.dumps([password.get_secret_value() for password in self.render.passwords]).encode()
        settings = {
            Status.ENCRYPTED: hashlib.pbkdf2_hmac("sha256", passwords, b"docqa render.passwords", 100_000).hex(),
            Status.TOO_MANY_PAGES: limits.max_pages_per_document,
            Status.FILE_TOO_LARGE: limits.max_file_bytes,
            Status.PAGE_TOO_LARGE: [limits.max_pixels_per_page, limits.max_aspect_ratio],
            Status.TIMEOUT: limits.document_timeout_s,
            Status.MEMORY_LIMIT: limits.render_memory_mb,
        }
        return {status.value: _digest(value) for status, value in settings.items()}

    def redacted(self) -> dict[str, Any]:
        """The config as written to run records: plain JSON values, secrets masked."""
        return self.model_dump(mode="json")


# Question fields added with typed answers: in a fingerprint only when set (see JobConfig.fingerprint).
TYPED_ANSWER_FIELDS = ("type", "choices", "constrained", "source")


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


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = tree
    keys = dotted.split(".")
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def format_validation_error(
    error: ValidationError, heading: str = "invalid job config", location: tuple[str, ...] = ()
) -> str:
    """Each problem at its place (``questions.0.text: ...``); ``location`` prefixes the fields of a part
    validated on its own (a request's questions)."""
    lines = []
    for problem in error.errors():
        field = ".".join([*location, *(str(part) for part in problem["loc"])]) or "(config)"
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}: {message}")
    return f"{heading}:\n" + "\n".join(lines)


def load_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None, require: tuple[str, ...] = ("input", "output")
) -> JobConfig:
    """Load the YAML config at ``path`` and apply dotted overrides (``{"model.dtype": "float32"}``); the
    fields in ``require`` must be set (a run needs its input and output, `docqa serve` neither)."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as error:
            raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config {path} is not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of fields, not {type(loaded).__name__}")
        tree = loaded or {}
    for dotted, value in (overrides or {}).items():
        try:
            _set_dotted(tree, dotted, value)
        except (IndexError, ValueError, TypeError, AttributeError):
            raise ConfigError(f"cannot override {dotted!r}: no such field in the config") from None
    try:
        config = JobConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None
    missing = [name for name in require if getattr(config, name) is None]
    if missing:
        lines = [f"  {name}: required here ({JobConfig.model_fields[name].description})" for name in missing]
        raise ConfigError("invalid job config:\n" + "\n".join(lines))
    return config
