import os
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.config import ConfigError, JobConfig
from pipeline.config_loading import load_config
from pipeline.fingerprints import config_fingerprint
from pipeline.pages import parse_page_selection, selection_contains
from pipeline.questions import QuestionTemplate
from pipeline.records import OUTPUT_SCHEMA, Status

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MINIMAL = {"input": "in", "output": "out", "questions": [{"id": "q", "text": "What?"}]}


@pytest.mark.parametrize("name", ["invoice.yaml", "transcribe.yaml"])
def test_shipped_examples_are_valid(name: str) -> None:
    config = load_config(EXAMPLES / name)
    assert config.model.id == "HuggingFaceM4/idefics2-8b"
    assert config.questions


@pytest.mark.parametrize(
    ("spec", "num_pages", "expected"),
    [
        ("all", 4, [1, 2, 3, 4]),
        ("first", 4, [1]),
        ("last", 4, [4]),
        ("1-3,-1", 10, [1, 2, 3, 10]),
        ("1-3,-1", 2, [1, 2]),
        ("-2--1", 5, [4, 5]),
        ([2, "4-5"], 6, [2, 4, 5]),
        (3, 2, []),
    ],
)
def test_page_selection(spec, num_pages: int, expected: list[int]) -> None:
    ranges = parse_page_selection(spec)
    assert [page for page in range(1, num_pages + 1) if selection_contains(ranges, page, num_pages)] == expected


@pytest.mark.parametrize("spec", ["0", "3-1", "1-x", "", "first,", "one"])
def test_bad_page_selection_is_rejected(spec: str) -> None:
    with pytest.raises(ValueError, match="page"):
        parse_page_selection(spec)


def test_template_variables() -> None:
    config = load_config(
        None, {**MINIMAL, "questions": [{"id": "a", "text": "Page {page_number}/{num_pages} of {file_name}?"}]}
    )
    assert config.questions[0].question("inv.pdf", 2, 5) == "Page 2/5 of inv.pdf?"


def test_invalid_config_names_every_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "input: in\noutput: out\n"
        "questions:\n  - {id: total, text: 'Total {amount}?', pages: '1-x'}\n  - {id: total, text: ok}\n"
        "model: {dtype: float8}\nactors: {min_actors: 3, max_actors: 1}\nunknown_field: 1\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    for expected in [
        "questions.0.text: unknown template variable(s) ['amount']",
        "questions.0.pages: invalid page range '1-x'",
        "model.dtype",
        "actors: max_actors (1) is below min_actors (3)",
        "unknown_field: Extra inputs are not permitted",
    ]:
        assert expected in message


def test_duplicate_question_ids_rejected() -> None:
    with pytest.raises(ConfigError, match=r"question ids must be unique; repeated: \['q'\]"):
        load_config(None, {**MINIMAL, "questions": [{"id": "q", "text": "a"}, {"id": "q", "text": "b"}]})


def test_cli_style_overrides_reach_nested_fields(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("input: in\noutput: out\nquestions: [{id: q, text: 'What?'}]\n")
    config = load_config(
        path, {"model.id": "/models/x", "actors.batch_size": 8, "questions.0.max_new_tokens": 5, "input": "other"}
    )
    assert (config.model.id, config.actors.batch_size, config.questions[0].max_new_tokens, config.input) == (
        "/models/x",
        8,
        5,
        os.path.join(os.getcwd(), "other"),  # a local path is made absolute against the working directory
    )
    assert load_config(path, {"input": "s3://bucket/in/"}).input == "s3://bucket/in/"  # a URI stays as it is
    with pytest.raises(ConfigError, match=r"cannot override 'questions\.7\.text'"):
        load_config(path, {"questions.7.text": "x"})


def test_fingerprint_changes_with_what_answers_depend_on_only() -> None:
    base = {"input": "in", "output": "out", "questions": [{"id": "q", "text": "Total?"}]}
    fingerprint = config_fingerprint(load_config(None, base))
    same_answers = ["model.prefix_cache=false", "actors.batch_size=16", "limits.document_timeout_s=10"]
    for assignment in same_answers:
        field, value = assignment.split("=")
        assert config_fingerprint(load_config(None, {**base, field: value})) == fingerprint, assignment
    for field, value in [
        ("model.id", "other/model"),
        ("questions.0.text", "Due?"),
        ("render.image_splitting", "false"),
    ]:
        assert config_fingerprint(load_config(None, {**base, field: value})) != fingerprint, field


def test_unreadable_and_non_mapping_configs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += _field_paths(annotation, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def test_the_docs_document_every_config_field_status_and_column() -> None:
    """The config reference is generated from the models (docs/hooks.py): every field is in it, under its path;
    every status and output column is described in the docs' pages."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "docs"))
    import hooks

    reference = "\n".join(hooks.reference(JobConfig))
    pages = "\n".join(path.read_text() for path in (root / "docs").glob("*.md"))
    paths = _field_paths(JobConfig) + [f"questions[].{path}" for path in _field_paths(QuestionTemplate)]
    missing = [path for path in paths if f"| `{path}` |" not in reference]
    missing += [f"status {status}" for status in Status if f"`{status.value}`" not in pages]
    missing += [f"column {name}" for name in OUTPUT_SCHEMA.names if f"`{name}`" not in pages]
    assert not missing
    assert hooks.MARKER in (root / "docs" / "config-reference.md").read_text()


def test_every_config_field_says_what_it_is() -> None:
    import inspect

    from pipeline import config, config_sections, questions

    models = [
        model
        for module in (config, config_sections, questions)
        for _, model in inspect.getmembers(module, inspect.isclass)
        if issubclass(model, BaseModel) and model.__module__ == module.__name__
    ]
    assert JobConfig in models and QuestionTemplate in models and len(models) > 10
    missing = [
        f"{model.__name__}.{name}" for model in models for name, f in model.model_fields.items() if not f.description
    ]
    assert missing == []
