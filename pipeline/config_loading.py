"""Reading a job config: its YAML file, the command line's dotted overrides (``--set model.dtype=float32``),
and validation errors said field by field (``questions.0.pages: invalid page range ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config import ConfigError, JobConfig


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
