"""The sections of the job config (pipeline/config.py ``JobConfig``): the model, rendering, limits, reading
values and words, the actor pool, storage, budgets and the endpoint; each field described, as the docs' config
reference shows them."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from pipeline.questions import QuestionList

DEFAULT_MODEL_ID = "HuggingFaceM4/idefics2-8b"


class ConfigError(ValueError):
    """An invalid job config; the message names each bad field and what is wrong with it."""


def _check_bounds(section: BaseModel, low: str, high: str) -> None:
    if getattr(section, high) < getattr(section, low):
        raise ValueError(f"{high} ({getattr(section, high)}) is below {low} ({getattr(section, low)})")


class StrictModel(BaseModel):
    """The base of every config model: an unknown key is an error (a typo never passes silently), and a loaded
    config does not change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(StrictModel):
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
    stop_at_newline: bool | None = Field(
        None, description="End answers at the first newline; null: on for raw prompts (base models run on otherwise)."
    )
    adapter: str | None = Field(
        None,
        description="PEFT (LoRA/QLoRA) adapter, Hub id or directory, applied on top of model.id; merged into the "
        "weights unless the base is quantized.",
    )
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


class RenderConfig(StrictModel):
    backend: Literal["pymupdf", "pdf2image"] = Field(
        "pymupdf", description="Rasterizer: PyMuPDF, or poppler through pdf2image (the text layer is PyMuPDF's)."
    )
    image_splitting: bool | None = Field(None, description="4 crops + the whole page; null keeps the checkpoint's.")
    passwords: list[SecretStr] = Field(
        default_factory=list,
        description="Tried in turn on encrypted PDFs; never logged or written out. `docqa submit` refuses them "
        "(they would travel in the job's files): use passwords_env there.",
    )
    passwords_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="The name of an environment variable holding more passwords, one per line, read where the "
        "documents are opened (on a cluster: a variable every Ray node has, from a KubeRay secret or `ray start`'s "
        "environment); its value never enters the config, the run record or a command line.",
    )
    isolation: Literal["strict", "best_effort"] = Field(
        "strict",
        description="strict: the render helper runs in its own namespaces under bubblewrap (no network, no other "
        "process, a read-only view of the interpreter) or the document fails with render_error, and a run refuses "
        "to start where that is impossible; best_effort: the strongest confinement this machine allows, recorded "
        "in the run.",
    )

    def password_values(self) -> tuple[str, ...]:
        """The passwords to try: ``passwords``, then those of the ``passwords_env`` variable (one per line)."""
        from_environment = os.environ.get(self.passwords_env, "") if self.passwords_env else ""
        listed = [password.get_secret_value() for password in self.passwords]
        return tuple(listed + [line for line in from_environment.splitlines() if line])

    task_memory_mb: int = Field(
        1024, ge=64, description="Memory Ray reserves per read/render/split task; bounds concurrent renders per node."
    )
    range_pages: int = Field(
        64,
        ge=1,
        description="A document with more pages to answer than this is rendered in page ranges of this many, each "
        "by its own task (in parallel, each under limits.document_timeout_s and limits.render_memory_mb); smaller "
        "documents share a render task, up to this many pages together.",
    )
    block_mb: int = Field(
        32,
        ge=1,
        description="Byte budget of a block of rendered pages handed from the CPU stages to the model: pages move on "
        "as they are rendered (text pages without images a megabyte at a time), in blocks of at most this size (a "
        "page larger than the budget is a block alone).",
    )


class LimitsConfig(StrictModel):
    max_pages_per_document: int = Field(
        2000, ge=1, description="A document with more pages is too_many_pages, whichever pages its questions name."
    )
    max_pixels_per_page: int = Field(
        80_000_000,
        ge=1,
        description="A page with more pixels is page_too_large: a PDF page at the resolution it is rendered or OCR'd "
        "at (OCR lowers its resolution to fit), an image (a TIFF page) at its own size as its header states it, "
        "checked before any pixel is decoded. 80 megapixels holds an A3 page scanned at 600 dpi.",
    )
    max_file_bytes: int = Field(256 * 1024 * 1024, ge=1, description="A larger file is file_too_large, never read.")
    max_aspect_ratio: float = Field(
        20.0, ge=1, description="A page whose longest side is more than this times its shortest is page_too_large."
    )
    document_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Wall-clock limit to open a document, and again to open and render each of its page ranges (a "
        "document of at most render.range_pages pages is one range); past it, timeout for the whole document.",
    )
    render_memory_mb: int = Field(
        2048,
        ge=256,
        description="Address-space cap of the process that opens and renders a document or one of its ranges; past "
        "it, memory_limit.",
    )
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
        "commits what it has but is degraded: exit code 3. Bad input (corrupt, unsupported_format, ...) never counts.",
    )


class ValuesConfig(StrictModel):
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


class TextLayerConfig(StrictModel):
    """When a page's own text layer is usable as an answer (questions with ``source: auto``)."""

    min_chars: int = Field(50, ge=1, description="Fewest non-space characters of a usable text layer.")
    min_readable_share: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Least share of its non-space characters that are letters, digits or common punctuation "
        "(not U+FFFD, private-use or control characters: what a font without a Unicode map extracts to).",
    )


class OcrConfig(StrictModel):
    """Words read by OCR from pages without a usable text layer: scans, photos, image files."""

    engine: Literal["tesseract", "none"] = Field(
        "tesseract",
        description="tesseract: pages without a usable text layer are read by Tesseract (through PyMuPDF, in the "
        "render helper) where a question needs their words: to answer from text (source text_layer or auto) or to "
        "find a typed answer's evidence (number, money, date); about 0.7 s of one CPU per page at 300 dpi, 3 "
        "times decoding and rendering the scan (BENCHMARKS.md, bench.scans). none: such pages have no words.",
    )
    languages: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$")]] = Field(
        default_factory=lambda: ["eng"],
        min_length=1,
        description="Tesseract's language codes (eng, deu, fra, chi_sim ...); each needs its trained data "
        "(Debian: tesseract-ocr-LANG).",
    )
    dpi: int = Field(
        300,
        ge=72,
        le=1200,
        description="The resolution pages are OCR'd at: a PDF page is rendered at it; an image finer than it is "
        "scaled down to it (Tesseract reads print best near 300 dpi, and its time grows with the pixels).",
    )
    evidence: Literal["typed", "all"] = Field(
        "typed",
        description="Which model answers have a page without a text layer OCR'd for their evidence: typed (number, "
        "money, date questions) or all (text questions too, at the OCR's cost on every such page).",
    )

    @property
    def language(self) -> str:
        """The languages as Tesseract takes them: eng+deu."""
        return "+".join(self.languages)


class ActorPoolConfig(StrictModel):
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


class StorageConfig(StrictModel):
    """Object storage client settings (S3 and S3-compatible stores). Credentials come from the standard AWS
    chain (environment, profile, instance role), never from this file."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; default AWS_ENDPOINT_URL or AWS.")
    region: str | None = Field(None, description="S3 region; default AWS_REGION or AWS_DEFAULT_REGION.")
    max_attempts: int = Field(
        10,
        ge=1,
        le=50,
        description="Attempts per request, standard retry mode: throttling (503 SlowDown) and transient 5xx are "
        "retried with backoff.",
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="Per connection attempt to object storage.")
    read_timeout_s: float = Field(60.0, gt=0, description="Per read from object storage.")
    max_pool_connections: int = Field(32, ge=1, description="Open connections to object storage per process.")


class BudgetConfig(StrictModel):
    """Caps for one run over a large backlog; what is left is reported and picked up by the next run."""

    max_documents: int | None = Field(
        None,
        ge=1,
        description="New or changed documents taken per run; the rest are counted and left for the next run.",
    )
    max_pages: int | None = Field(
        None,
        ge=1,
        description="Pages rendered per run, whole documents only; a document that does not fit waits for the "
        "next run.",
    )


class ServeConfig(StrictModel):
    """The online endpoint (`docqa serve`). The model replicas use `model`, `render` and `limits` as the
    batch pipeline does; `actors.batch_size` is the most pages one model call takes."""

    host: str = Field("127.0.0.1", description="Address the endpoint listens on (0.0.0.0: every interface).")
    port: int = Field(8000, ge=1, le=65535, description="Port the endpoint listens on.")
    token: SecretStr | None = Field(None, description="Bearer token; DOCQA_SERVE_TOKEN in the environment wins.")
    min_replicas: int = Field(1, ge=1, description="Model replicas kept running.")
    max_replicas: int = Field(1, ge=1, description="Model replicas Serve may scale up to under load.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Pages in flight per model replica to aim at.")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="How long a model call waits to fill its batch.")
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest document accepted (413 above).")
    max_pages: int = Field(20, ge=1, description="Most pages of one uploaded document (413 above).")
    max_questions: int = Field(16, ge=1, description="Most questions in one request (422 above).")
    request_timeout_s: float = Field(
        120.0,
        gt=0,
        description="A request's whole time (its wait, its render, its answers); past it, 504, its render stopped and "
        "its model calls cancelled.",
    )
    max_requests_in_flight: int = Field(
        4, ge=1, description="Requests an ingress replica answers at once, each with a render helper of its own."
    )
    max_requests_queued: int = Field(
        16, ge=0, description="Requests that may wait for a turn beyond those; past that, 503 with Retry-After."
    )
    question_sets: dict[str, QuestionList] = Field(
        default_factory=dict, description="Named question templates a request can pick with question_set=NAME."
    )

    @model_validator(mode="after")
    def _bounds(self) -> ServeConfig:
        _check_bounds(self, "min_replicas", "max_replicas")
        return self
