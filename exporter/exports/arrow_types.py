"""The Arrow types of an export's columns, and the record batches of the ADBC driver
made into them: what `.parquet` and `.arrow` hold (docs/api.md, "Parquet and Arrow").

The driver reads PostgreSQL's binary COPY into Arrow; most types arrive as they should
(integers, floats, booleans, text, date, time, timestamp, timestamptz as
timestamp(us, UTC), uuid as the `arrow.uuid` extension, json/jsonb as `arrow.json`,
bytea as binary, arrays as lists). Two need a step here: `numeric` comes as text
(decimal128 when its declared precision fits, 38 digits; otherwise text, which holds any
numeric exactly), and `interval` as month_day_nano, which Parquet cannot store and
polars cannot read: it becomes PostgreSQL's own three fields, a struct of months, days
and microseconds. Types the driver only passes as raw binary are cast to text in SQL
before they get there (`needs_text`).
"""

from __future__ import annotations

from typing import Any

# Types the driver turns into proper Arrow values (pg_type.typname); anything else
# (inet, enums, ranges, money, timetz, bit, geometric types, domains over those...) is
# read as its text.
NATIVE = frozenset({
    "bool", "int2", "int4", "int8", "float4", "float8", "numeric", "oid",
    "text", "varchar", "bpchar", "name", "char",
    "date", "time", "timestamp", "timestamptz", "interval",
    "uuid", "json", "jsonb", "bytea",
})
DECIMAL_DIGITS = 38  # decimal128
INTERVAL_FIELDS = (("months", "int32"), ("days", "int32"), ("microseconds", "int64"))


def needs_text(typname: str, element: str | None) -> str | None:
    """The cast that makes a result column of type `typname` (an array's `element`
    type, if one) readable, or None when the driver reads it as it is."""
    if element is not None:
        return None if element in NATIVE else "text[]"
    return None if typname in NATIVE else "text"


def _pa() -> Any:
    import pyarrow  # a heavy import, only when an Arrow export runs

    return pyarrow


def _numeric(field_metadata: dict[bytes, bytes] | None) -> Any:
    pa = _pa()
    typmod = int((field_metadata or {}).get(b"POSTGRESQL:typmod", b"-1"))
    if typmod >= 4:
        precision, scale = ((typmod - 4) >> 16) & 0xFFFF, (typmod - 4) & 0xFFFF
        if 0 < precision <= DECIMAL_DIGITS and scale <= precision:
            return pa.decimal128(precision, scale)
    return pa.string()


def _target(arrow_type: Any, metadata: dict[bytes, bytes] | None) -> Any:
    """The type a driver's type becomes."""
    pa = _pa()
    if isinstance(arrow_type, pa.BaseExtensionType) and arrow_type.extension_name == "arrow.opaque":
        if arrow_type.type_name == "numeric":
            return _numeric(metadata)
        return arrow_type.storage_type  # text (needs_text made sure of it)
    if arrow_type == pa.month_day_nano_interval():
        return pa.struct([(name, getattr(pa, kind)()) for name, kind in INTERVAL_FIELDS])
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        item = arrow_type.value_field
        return pa.list_(pa.field(item.name, _target(item.type, item.metadata)))
    return arrow_type


def target_schema(schema: Any) -> Any:
    """The schema of what an export writes, from the driver's."""
    pa = _pa()
    return pa.schema([pa.field(f.name, _target(f.type, f.metadata), f.nullable)
                      for f in schema])


def _interval(array: Any, target: Any) -> Any:
    """month_day_nano values as (months, days, microseconds): PostgreSQL's intervals
    hold microseconds, so nothing is lost."""
    import numpy

    pa = _pa()
    layout = numpy.dtype([("months", "<i4"), ("days", "<i4"), ("nanoseconds", "<i8")])
    _validity, data = array.buffers()
    values = numpy.frombuffer(data, dtype=layout, count=array.offset + len(array))
    values = values[array.offset:]
    children = [pa.array(values["months"]), pa.array(values["days"]),
                pa.array(values["nanoseconds"] // 1000)]
    mask = None if array.null_count == 0 else array.is_null()
    return pa.StructArray.from_arrays(children, fields=list(target), mask=mask)


# The driver writes numeric's special values as C does; PostgreSQL's own spelling instead.
_SPECIAL = (("^nan$", "NaN"), ("^inf$", "Infinity"), ("^-inf$", "-Infinity"))


def _numeric_text(array: Any) -> Any:
    import pyarrow.compute as pc

    for pattern, spelling in _SPECIAL:
        array = pc.replace_substring_regex(array, pattern, spelling)
    return array


def convert(array: Any, target: Any) -> Any:
    """One column of a driver's batch, as `target`."""
    pa = _pa()
    if array.type == target:
        return array
    if isinstance(array.type, pa.BaseExtensionType):
        array = array.storage
        if pa.types.is_string(array.type):
            array = _numeric_text(array)
        return array if array.type == target else array.cast(target)
    if array.type == pa.month_day_nano_interval():
        return _interval(array, target)
    if pa.types.is_list(array.type):
        values = convert(array.values, target.value_type)
        offsets = array.offsets
        mask = None if array.null_count == 0 else array.is_null()
        return pa.ListArray.from_arrays(offsets, values, type=target, mask=mask)
    return array.cast(target)


def convert_batch(batch: Any, schema: Any) -> Any:
    """A driver's record batch in the export's `schema` (target_schema)."""
    pa = _pa()
    columns = []
    for column, field in zip(batch.columns, schema, strict=True):
        try:
            columns.append(convert(column, field.type))
        except pa.ArrowInvalid as error:
            # NaN or infinity in a numeric(p,s) column: a decimal cannot hold them.
            raise Unrepresentable(f"column {field.name!r} holds a value {field.type} cannot"
                                  f" hold ({str(error).splitlines()[0]}); select it as text:"
                                  f" select=...,{field.name}::text") from error
    return pa.RecordBatch.from_arrays(columns, schema=schema)


class Unrepresentable(ValueError):
    """A value the column's Arrow type cannot hold."""
