"""MkDocs hook: the config reference, generated at build time from the pydantic models' field descriptions
(pipeline/config.py, pipeline/config_sections.py, pipeline/questions.py), so it can never go stale. A page
holds the marker ``<!-- config-reference -->`` where the tables go; a build where no page holds it fails."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = "<!-- config-reference -->"
_seen: set[str] = set()
_written: list[str] = []  # the pages the reference was written into, this build


def _type_text(annotation: Any) -> str:
    """A field's type as a reader wants it: choices spelled out, None as null."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{value}`" for value in arguments)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_text(argument) for argument in arguments)
    if origin is typing.Annotated:
        return _type_text(arguments[0])
    if origin in (list, tuple):
        return f"list of {_type_text(arguments[0])}" if arguments else "list"
    if origin is dict:
        return f"mapping of {_type_text(arguments[0])} to {_type_text(arguments[1])}"
    if annotation is type(None):
        return "null"
    name = getattr(annotation, "__name__", str(annotation))
    return {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "SecretStr": "secret"}.get(
        name, name
    )


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == [] or value == {}:
        return f"`{value}`"
    return f"`{value}`"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds (a section, or the element of a list of them), if any."""
    for candidate in (annotation, *typing.get_args(annotation)):
        for inner in (candidate, *typing.get_args(candidate)):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def reference(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Markdown: one table per config model, sections after the fields that hold them."""
    hints = typing.get_type_hints(model, include_extras=True)
    rows, sections = [], []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        section = _model_of(hints[name])
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        if section is not None and section is not model:
            many = typing.get_origin(hints[name]) is list or any(
                typing.get_origin(inner) is list for inner in typing.get_args(hints[name])
            )
            kind = f"list of {section.__name__}" if many else "section"
            rows.append(f"| `{path}` | {kind} | {_default_text(field)} | {description} |")
            sections.append((section, f"{path}[]." if many else f"{path}."))
        else:
            rows.append(f"| `{path}` | {_type_text(hints[name])} | {_default_text(field)} | {description} |")
    lines = ["| field | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for section, section_prefix in sections:
        if section.__name__ in _seen:
            continue
        _seen.add(section.__name__)
        title = section_prefix.rstrip(".").replace("[]", "[ ]")
        doc = " ".join((section.__doc__ or "").split())
        lines += [f"### `{title}`", "", doc, "", *reference(section, section_prefix)]
    return lines


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    from pipeline.config import JobConfig

    _seen.clear()
    _written.append(page.file.src_path)
    return markdown.replace(MARKER, "\n".join(reference(JobConfig)))


def on_pre_build(config) -> None:
    _written.clear()


def on_post_build(config) -> None:
    if not _written:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"no page holds {MARKER}: the config reference was not written")
