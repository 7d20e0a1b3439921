"""The merged records as one Parquet file, streamed: memory stays bounded however many records.

    merged JSON lines ──blocks of BLOCK_BYTES──> pass 1: each block's types (pyarrow.json),
        unified into one schema ──> pass 2: each block read again with that schema
        ──> pyarrow.parquet.ParquetWriter, a row group or more per block

Both passes parse in C++ (pyarrow.json); Python's json reads only a block that
Arrow refuses (a name that is not UTF-8 comes back from JSON as a lone surrogate,
which is written as the text `\\udcXX`, as Arrow strings must be UTF-8), and
`records_table` (`crawlproc.open(out).to_arrow()`) makes a table the same way.

The schema holds every field of every record. Widening, when records differ:
a field a record lacks is null; integers in a field where other records have
floats become floats; a struct gets the fields of all its records. A field
whose values have kinds that do not mix (a number in one record, a string or an
object in another) is a `ParquetSchemaError` naming the first record, and its
task, that does not fit; so is an integer beyond 64 bits (pyarrow.json would
read it as a float, rounded). Strings stay strings (pyarrow.json would read some
as timestamps). Parquet has no struct without fields: a field that is only ever
an empty object, at any depth, is written as a column of nulls (`_writable`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from crawlproc.errors import CrawlprocError

BLOCK_BYTES = 8 << 20     # JSON lines parsed at once: a block's table (a row group) is all that is held
_TIME_TYPES = (pa.types.is_timestamp, pa.types.is_date, pa.types.is_time)
_INT64 = range(-(1 << 63), 1 << 63)


class ParquetSchemaError(CrawlprocError):
    """A merged record does not fit the Parquet schema of the others."""


class ParquetWriteError(CrawlprocError):
    """Arrow could not write the merged records as Parquet."""


class RecordTypesError(CrawlprocError):
    """Records whose values for one field are of kinds that do not mix in one column."""


def records_table(records: Iterable[dict], describe_record: Callable[[int], str] | None = None) -> pa.Table:
    """The records as one Table in memory, with every field of every record (see the widening
    above; names that are not UTF-8 as `\\udcXX`). RecordTypesError if a field's kinds do not mix,
    naming the record (and, given `describe_record(n)`, its task) and the field."""
    rows = [_valid_utf8(record) for record in records]
    try:
        return _table_of(rows)
    except _NOT_A_COLUMN as exc:
        for n, record in enumerate(rows):
            if (wide := _wide_integer(record)) is not None:
                raise RecordTypesError(f"record {n + 1:,} {_too_wide(*wide)}, which Arrow cannot hold") from None
        clash = _first_clash(rows)
        if clash is None:
            raise RecordTypesError(f"the records do not fit one table: {str(exc).splitlines()[0]}") from None
        name, n, said = clash
        where = f" ({describe_record(n)})" if describe_record is not None and n is not None else ""
        record = f"record {n + 1:,}{where}, " if n is not None else ""
        raise RecordTypesError(f"the records do not fit one table: {record}field {name!r}: {said}") from None


_NOT_A_COLUMN = (pa.ArrowException, TypeError, ValueError, OverflowError)


def _first_clash(rows: list[dict]) -> tuple[str, int | None, str] | None:
    """(field, record index, what is wrong) of the first field whose values make no column: the
    first value of another kind than the field's first; or (field, None, what Arrow says of it)
    when the kinds differ deeper down."""
    for name in dict.fromkeys(name for record in rows for name in record):
        values = [record.get(name) for record in rows]
        try:
            pa.array(values)
            continue
        except _NOT_A_COLUMN as exc:
            arrow_says = str(exc).splitlines()[0]
        kinds = ((n, value, _kind(value)) for n, value in enumerate(values) if value is not None)
        first = next(kinds, None)
        for n, value, kind in kinds:
            if kind != first[2]:
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
                return name, n, f"{shown} is {kind}, where record {first[0] + 1:,} holds {first[2]}"
        return name, None, arrow_says
    return None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an object" if isinstance(value, dict) else "a list" if isinstance(value, list) else type(value).__name__


def _table_of(records: list[dict]) -> pa.Table:
    """Columns inferred from all the records: `Table.from_pylist` takes its fields from the
    first record alone, and would drop a field that only later records have."""
    names = dict.fromkeys(name for record in records for name in record)
    return pa.Table.from_pydict({name: [record.get(name) for record in records] for name in names})


def write_parquet(merged_jsonl: Path, target: Path, describe_record: Callable[[int], str]) -> None:
    """`merged_jsonl`'s records into the Parquet file `target`; `describe_record(n)` names the
    task of the n-th record (from 0) for an error message. Any refusal is a CrawlprocError."""
    try:
        _write_blocks(merged_jsonl, target, describe_record)
    except pa.ArrowException as exc:  # unforeseen: still one line, not an internal error (I/O errors are OSError)
        raise ParquetWriteError(f"cannot write Parquet: {str(exc).splitlines()[0]}; "
                                "use --format jsonl or csv") from None


def _write_blocks(merged_jsonl: Path, target: Path, describe_record: Callable[[int], str]) -> None:
    schema = _unified_schema(merged_jsonl, describe_record)
    if not schema.names:  # no records
        pq.write_table(pa.table({}), target)
        return
    writable = _writable_schema(schema)
    with pq.ParquetWriter(target, writable) as writer:
        first = 0
        for block in _blocks(merged_jsonl):
            table = _block_table(block, schema, first, describe_record)
            writer.write_table(_writable(table, writable))
            first += table.num_rows


def _blocks(path: Path) -> Iterator[bytes]:
    """Whole lines, about BLOCK_BYTES at a time."""
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            if not block.endswith(b"\n"):
                block += f.readline()
            yield block


def _unified_schema(path: Path, describe_record: Callable[[int], str]) -> pa.Schema:
    schema: pa.Schema | None = None
    first = 0
    for block in _blocks(path):
        try:
            table = pj.read_json(pa.BufferReader(block), read_options=_read_options(block))
            types, rows = _strings_for_times(table.schema), table.num_rows
            if _may_hold_wide_integers(table):
                _refuse_wide_integers(block, first, describe_record)
        except pa.ArrowInvalid:
            records = _python_records(block)
            types, rows = _python_schema(records, first, describe_record), len(records)
        try:
            schema = _unify(schema, types, first, describe_record)
        except ParquetSchemaError:  # name the very record
            _python_schema(_python_records(block), first, describe_record, start=schema)
            raise
        first += rows
    return schema if schema is not None else pa.schema([])


def _block_table(block: bytes, schema: pa.Schema, first: int, describe_record: Callable[[int], str]) -> pa.Table:
    try:
        return pj.read_json(pa.BufferReader(block), read_options=_read_options(block),
                            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error"))
    except pa.ArrowInvalid:
        records = _python_records(block)
    try:
        return pa.Table.from_pylist(records, schema=schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        for n, record in enumerate(records):  # find the one to name
            try:
                pa.Table.from_pylist([record], schema=schema)
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
                raise _record_error(record, first + n, describe_record, exc) from None
        raise


def _read_options(block: bytes) -> pj.ReadOptions:
    return pj.ReadOptions(use_threads=False, block_size=len(block) + 1)


def _python_records(block: bytes) -> list[dict]:
    return [_valid_utf8(record) for record in json.loads(b"[" + b",".join(block.splitlines()) + b"]")]


def _python_schema(records: list[dict], first: int, describe_record: Callable[[int], str],
                   start: pa.Schema | None = None) -> pa.Schema:
    """The types of `records`, or a ParquetSchemaError naming the first that does not fit
    the others (and `start`)."""
    try:
        if start is None:
            return _table_of(records).schema
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        pass
    schema = start
    for n, record in enumerate(records):
        try:
            types = pa.Table.from_pylist([record]).schema
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            raise _record_error(record, first + n, describe_record, exc) from None
        schema = _unify(schema, types, first + n, describe_record, approximate=False)
    return schema


def _unify(schema: pa.Schema | None, types: pa.Schema, first: int, describe_record: Callable[[int], str],
           approximate: bool = True) -> pa.Schema:
    """The schema of both; `types` are those of the records from number `first` on (of that one
    alone unless `approximate`)."""
    if schema is None:
        return types
    try:
        return pa.unify_schemas([schema, types], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ParquetSchemaError(_does_not_fit(first, describe_record, exc, approximate)) from None


def _does_not_fit(index: int, describe_record: Callable[[int], str], exc: Exception, approximate: bool) -> str:
    which = describe_record(index)
    where = (f"the records from number {index + 1:,} on ({which}) do" if approximate
             else f"record {index + 1:,} ({which}) does")
    return (f"cannot write Parquet: {where} not fit the types of the records before: "
            f"{str(exc).splitlines()[0]}; use --format jsonl or csv")


def _record_error(record: dict, index: int, describe_record: Callable[[int], str],
                  exc: Exception) -> ParquetSchemaError:
    """Why the `index`-th record alone does not fit: an integer Parquet cannot hold, or `exc`."""
    wide = _wide_integer(record)
    if wide is None:
        return ParquetSchemaError(_does_not_fit(index, describe_record, exc, False))
    return _too_wide_error(index, describe_record, wide)


def _refuse_wide_integers(block: bytes, first: int, describe_record: Callable[[int], str]) -> None:
    """A ParquetSchemaError for the first record of `block` with an integer beyond 64 bits."""
    for n, line in enumerate(block.splitlines()):
        if (wide := _wide_integer(json.loads(line))) is not None:
            raise _too_wide_error(first + n, describe_record, wide)


def _too_wide_error(index: int, describe_record: Callable[[int], str], wide: tuple[str, int]) -> ParquetSchemaError:
    return ParquetSchemaError(f"cannot write Parquet: record {index + 1:,} ({describe_record(index)}) "
                              f"{_too_wide(*wide)}, which Parquet cannot hold; use --format jsonl or csv")


def _too_wide(where: str, value: int) -> str:
    shown = f" ({value})" if value.bit_length() <= 128 else ""
    return f"has an integer beyond 64 bits in field {where!r}{shown}"


def _wide_integer(value: Any, where: str = "") -> tuple[str, int] | None:
    """(where, value) of the first integer in `value` beyond 64 bits; where: `meta.sizes[2]`."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if value in _INT64 else (where, value)
    if isinstance(value, dict):
        items: Iterable[tuple[str, Any]] = ((f"{where}.{key}" if where else key, item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{where}[{i}]", item) for i, item in enumerate(value))
    else:
        return None
    for place, item in items:
        if (found := _wide_integer(item, place)) is not None:
            return found
    return None


def _may_hold_wide_integers(table: pa.Table) -> bool:
    """pyarrow.json reads an integer beyond 64 bits as a float, rounded: whether a float of
    `table` is that large (a float literal may be too: Python then reads the block to tell)."""
    return any(_has_huge_float(chunk) for column in table.columns for chunk in column.chunks)


def _has_huge_float(array: pa.Array) -> bool:
    kind = array.type
    if pa.types.is_floating(kind):
        largest = pc.max(pc.abs(array)).as_py()
        return largest is not None and largest >= _INT64.stop
    if pa.types.is_struct(kind):
        return any(_has_huge_float(child) for child in array.flatten())
    if pa.types.is_list(kind):
        return _has_huge_float(array.flatten())
    return False


def _writable_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` with each struct that has no fields, at any depth, as null: Parquet has no such struct."""
    return pa.schema([field.with_type(_writable_type(field.type)) for field in schema])


def _writable_type(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_struct(kind):
        if kind.num_fields == 0:
            return pa.null()
        return pa.struct([kind.field(i).with_type(_writable_type(kind.field(i).type))
                          for i in range(kind.num_fields)])
    if pa.types.is_list(kind):  # the only list kind pyarrow.json and from_pylist make
        return pa.list_(kind.value_field.with_type(_writable_type(kind.value_type)))
    return kind


def _writable(table: pa.Table, writable: pa.Schema) -> pa.Table:
    """`table` in the `writable` schema: each value of a struct without fields becomes null."""
    if table.schema == writable:
        return table
    columns = [pa.chunked_array([_writable_array(chunk) for chunk in column.chunks], type=field.type)
               for column, field in zip(table.columns, writable)]
    return pa.Table.from_arrays(columns, schema=writable)


def _writable_array(array: pa.Array) -> pa.Array:
    kind = array.type
    if kind == _writable_type(kind):
        return array
    if pa.types.is_struct(kind):
        if kind.num_fields == 0:
            return pa.nulls(len(array))
        children = [_writable_array(child) for child in array.flatten()]
        return pa.StructArray.from_arrays(children, fields=list(_writable_type(kind)), mask=array.is_null())
    # a list (the only other kind _writable_type changes): `offsets` follow a slice, `values` do not
    return pa.ListArray.from_arrays(array.offsets, _writable_array(array.values),
                                    type=_writable_type(kind), mask=array.is_null())


def _strings_for_times(schema: pa.Schema) -> pa.Schema:
    """pyarrow.json reads ISO-looking strings as timestamps; the records hold strings."""
    return pa.schema([field.with_type(_string_for_time(field.type)) for field in schema])


def _string_for_time(kind: pa.DataType) -> pa.DataType:
    if any(test(kind) for test in _TIME_TYPES):
        return pa.string()
    if pa.types.is_struct(kind):
        return pa.struct([kind.field(i).with_type(_string_for_time(kind.field(i).type))
                          for i in range(kind.num_fields)])
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return pa.list_(kind.value_field.with_type(_string_for_time(kind.value_type)))
    return kind


def _valid_utf8(value: Any) -> Any:
    """Lone surrogates (from non-UTF-8 names) written as \\udcXX, as Arrow strings must be UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_valid_utf8(k): _valid_utf8(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_valid_utf8(v) for v in value]
    return value
