"""The job config: one validated model (``JobConfig``, its sections, and the question templates of
pipeline/questions.py), loaded from YAML and overridable field by field from the CLI (pipeline/config_loading.py).
Every field is described; the docs' config reference is generated from these descriptions (docs/hooks.py)."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config_sections import (
    ActorPoolConfig,
    BudgetConfig,
    ConfigError,
    LimitsConfig,
    ModelConfig,
    OcrConfig,
    RenderConfig,
    ServeConfig,
    StorageConfig,
    StrictModel,
    TextLayerConfig,
    ValuesConfig,
)
from pipeline.questions import QuestionList, QuestionTemplate

# The config's sections are defined in pipeline/config_sections.py and read from here with the config.
__all__ = [
    "ActorPoolConfig",
    "BudgetConfig",
    "ConfigError",
    "JobConfig",
    "LimitsConfig",
    "ModelConfig",
    "OcrConfig",
    "RenderConfig",
    "ServeConfig",
    "StorageConfig",
    "TextLayerConfig",
    "ValuesConfig",
]


class JobConfig(StrictModel):
    input: str | None = Field(
        None,
        min_length=1,
        description="A folder (every file below it: PDFs and image files, told apart by content; a link to a file or "
        "folder inside it is listed where the target is, one leaving it only with input_follow_links), one file, a "
        "glob (`data/**/*.pdf`), an "
        "`s3://bucket/prefix/` (recursive) or an S3 glob (`s3://bucket/2026-*/*.pdf`, `*` spans `/`), or a `.txt` "
        "file listing one URI per line (a `#` at the start of a line or after a space starts a comment; `inv#1.pdf` "
        "is a name). Required by `docqa run`, `nightly` and `submit`; `docqa serve` reads none.",
    )
    output: str | None = Field(
        None,
        min_length=1,
        description="Folder or s3:// prefix holding the Delta tables answers, current, items and runs. Required by "
        "`docqa run`, `nightly` and `submit`; `docqa serve` writes none.",
    )
    input_follow_links: bool = Field(
        False,
        description="Follow symbolic links that lead out of a local input folder (each target listed once, under "
        "its own path). Off: such links are skipped, so a link to / cannot make a run read the whole machine. "
        "Links to files or folders inside the input are listed where their target is either way.",
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
    ocr: OcrConfig = Field(OcrConfig(), description="Words read by OCR where a page has no usable text layer.")

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

    @property
    def model_answers(self) -> bool:
        """Whether the model may answer some question (``source`` model or auto). When none can, a run loads
        no model and asks for no GPU: every answer comes from the pages' text."""
        return any(question.source != "text_layer" for question in self.questions)

    def questions_for_page(self, page_number: int, num_pages: int) -> list[QuestionTemplate]:
        return [question for question in self.questions if question.applies_to(page_number, num_pages)]

    def redacted(self) -> dict[str, Any]:
        """The config as written to run records: plain JSON values, secrets masked."""
        return self.model_dump(mode="json")
