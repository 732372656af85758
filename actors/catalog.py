"""The supported model families as data: their names, the checkpoints' model_type, prompt formats,
quantizations and known checkpoints. Free of torch and transformers, so that the driver can check a
checkpoint against them without importing the adapters (actors/families.py maps each to its adapter)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ConfigError

# Both families are prompted alike: the instruct turn, or the base models' Question/Answer frame.
PROMPT_FORMATS = {
    "chat": "User:<image>{question}<end_of_utterance>\nAssistant:",
    "raw": "<image>Question: {question} Answer:",
}


@dataclass(frozen=True)
class Checkpoint:
    id: str
    prompt_format: str  # "chat" or "raw"
    note: str


@dataclass(frozen=True)
class FamilyInfo:
    """What `docqa models` shows of a family, and what the config checks rely on."""

    name: str
    model_type: str  # config.json's model_type
    classes: str
    image_processor: str  # the image processor class transformers builds from the checkpoint's processor file
    prompt_formats: dict[str, str]  # format → prompt, with {question}
    unknown_prompt_format: str  # the format of a checkpoint that is not listed and has no chat template
    image_splitting: bool
    quantization: tuple[str, ...]
    checkpoints: tuple[Checkpoint, ...]


IDEFICS2 = FamilyInfo(
    name="idefics2",
    model_type="idefics2",
    classes="Idefics2ForConditionalGeneration + Idefics2Processor",
    image_processor="Idefics2ImageProcessor",
    prompt_formats=PROMPT_FORMATS,
    unknown_prompt_format="raw",  # Idefics2 instruct checkpoints ship a chat template, base ones do not
    image_splitting=True,
    quantization=("bnb-4bit", "awq"),
    checkpoints=(
        Checkpoint("HuggingFaceM4/idefics2-8b", "chat", "instruct, the default"),
        Checkpoint("HuggingFaceM4/idefics2-8b-base", "raw", "base: answers end at the first newline"),
        Checkpoint("HuggingFaceM4/idefics2-8b-chatty", "chat", "long answers: transcription, summaries"),
        Checkpoint("HuggingFaceM4/idefics2-8b-AWQ", "chat", "AWQ 4-bit language model: quantization awq"),
    ),
)
IDEFICS = FamilyInfo(
    name="idefics",
    model_type="idefics",
    classes="IdeficsForVisionText2Text + IdeficsProcessor",
    image_processor="IdeficsImageProcessor",
    prompt_formats=PROMPT_FORMATS,
    unknown_prompt_format="chat",  # Idefics1 processors ship no chat template; most checkpoints are instruct
    image_splitting=False,
    quantization=("bnb-4bit",),
    checkpoints=(
        Checkpoint("HuggingFaceM4/idefics-9b-instruct", "chat", "Idefics1 instruct"),
        Checkpoint("HuggingFaceM4/idefics-9b", "raw", "Idefics1 base: answers end at the first newline"),
        Checkpoint("HuggingFaceM4/idefics-80b-instruct", "chat", "Idefics1 80B instruct"),
    ),
)
FAMILIES: dict[str, FamilyInfo] = {family.model_type: family for family in (IDEFICS2, IDEFICS)}


def family_of(model_type: str, model_id: str) -> FamilyInfo:
    """The family of a checkpoint whose config.json says ``model_type``, or an error naming the supported ones."""
    if model_type not in FAMILIES:
        supported = ", ".join(f"{info.name} ({info.model_type})" for info in FAMILIES.values())
        raise ConfigError(f"{model_id} is a {model_type!r} checkpoint; supported families: {supported}")
    return FAMILIES[model_type]
