"""A record's Arrow schema, derived from its fields (pipeline/records.py: the records that cross the stage
boundaries), and records to and from Arrow tables.

Why the schemas are derived by hand rather than with a library: pydantic-to-pyarrow (the maintained option)
takes pydantic models, and these records are plain dataclasses on the hot path (a page per call, a row per
question): validation there would cost time for nothing, the stages build them from trusted values.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa


def arrow(data_type: pa.DataType, nullable: bool = True, zero_copy: bool = False) -> dict[str, Any]:
    """A field's Arrow type where its Python type does not say it (int32, float32, a struct), for
    ``dataclasses.field(metadata=...)``; ``zero_copy``: a numpy buffer wrapped by the table, never copied."""
    return {"arrow": data_type, "nullable": nullable, "zero_copy": zero_copy}


PYTHON_TO_ARROW: dict[Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    bytes: pa.binary(),
    datetime.date: pa.date32(),
    list[str]: pa.list_(pa.string()),
    list[int]: pa.list_(pa.int64()),
    list[bool]: pa.list_(pa.bool_()),
    list[list[str]]: pa.list_(pa.list_(pa.string())),
}


@functools.cache
def schema_of(record: type) -> pa.Schema:
    """The Arrow schema of a record: its fields in order, each of the type its annotation names (``X | None``
    is nullable, ``X`` is not) unless ``arrow(...)`` metadata says otherwise."""
    hints = typing.get_type_hints(record)
    fields = []
    for item in dataclasses.fields(record):
        hint = hints[item.name]
        arguments = typing.get_args(hint)
        optional = isinstance(hint, types.UnionType) and type(None) in arguments
        base = next(argument for argument in arguments if argument is not type(None)) if optional else hint
        if "arrow" in item.metadata:
            fields.append(pa.field(item.name, item.metadata["arrow"], nullable=item.metadata["nullable"]))
        elif nested := _nested_record(base):
            fields.append(pa.field(item.name, pa.list_(pa.struct(list(schema_of(nested)))), nullable=optional))
        else:
            fields.append(pa.field(item.name, PYTHON_TO_ARROW[base], nullable=optional))
    return pa.schema(fields)


def _nested_record(hint: Any) -> type | None:
    """The record of a ``list[Record]`` field (a list of structs in Arrow), or None."""
    arguments = typing.get_args(hint)
    if typing.get_origin(hint) is list and arguments and dataclasses.is_dataclass(arguments[0]):
        return arguments[0]
    return None


R = TypeVar("R")


def _wrapped(buffer: np.ndarray) -> pa.Array:
    """A one-element binary array over ``buffer``'s memory (no copy)."""
    offsets = pa.py_buffer(np.array([0, memoryview(buffer).nbytes], dtype=np.int32))
    return pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(buffer)])


def to_table(records: Sequence[Any], record: type) -> pa.Table:
    """Records as a table of exactly ``schema_of(record)``; a ``zero_copy`` field's numpy buffers are wrapped,
    one chunk per record (megabytes of raw pixels are never copied, and Ray need not serialize rows to
    estimate their size)."""
    schema = schema_of(record)
    columns = []
    for item, schema_field in zip(dataclasses.fields(record), schema, strict=True):
        values = [getattr(value, item.name) for value in records]
        if nested := _nested_fields(record).get(item.name):
            names = [inner.name for inner in dataclasses.fields(nested)]
            values = [[{name: getattr(inner, name) for name in names} for inner in value] for value in values]
        if item.metadata.get("zero_copy"):
            columns.append(pa.chunked_array([_wrapped(value) for value in values], type=schema_field.type))
        else:
            columns.append(pa.array(values, type=schema_field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def from_table(table: pa.Table | pa.RecordBatch, record: type[R]) -> list[R]:
    """The records of a table written by ``to_table`` (its columns by name; extra columns are ignored)."""
    names = [item.name for item in dataclasses.fields(record)]
    columns = [table.column(name).to_pylist() for name in names]
    for position, name in enumerate(names):
        if nested := _nested_fields(record).get(name):
            columns[position] = [[nested(**inner) for inner in value] for value in columns[position]]
    return [record(*values) for values in zip(*columns, strict=True)]


@functools.cache
def _nested_fields(record: type) -> dict[str, type]:
    """A record's ``list[Record]`` fields, by name."""
    hints = typing.get_type_hints(record)
    return {item.name: nested for item in dataclasses.fields(record) if (nested := _nested_record(hints[item.name]))}
