"""Reading data files: every supported format into records located as `file:line` (jsonl, csv) or `file row N`
(the others), a row that cannot be read kept as the reason it cannot. Text files are checked from their first bytes
before they are parsed: a binary file, or one with no line break, is refused by what it is."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import AlignError  # files imports nothing else of align: the recipe's help reads FORMATS

# owner/name, owner/name:split, owner/name:config:split; a split may be sliced as datasets slices it: test[:500]
HUB_ID = re.compile(r"^(?P<name>[\w.-]+/[\w.-]+)(?::(?P<config>[\w.-]+)(?=:))?(?::(?P<split>[\w.-]+(?:\[[\d:%-]*\])?))?$")


class DataError(AlignError, ValueError):
    """Data that cannot be used as it is; the message names the file, the row, the field and the fix."""


@dataclass
class Record:
    where: str  # "data/qa.jsonl:17" or "data/qa.parquet row 17"
    values: dict[str, Any]


@dataclass
class Invalid(Exception):
    reason: str  # counter key: empty, missing_field, wrong_type, bad_messages, bad_json, not_a_number, identical, too_long
    message: str


def read_records(path: str | Path) -> list[Record]:
    if not Path(path).exists() and HUB_ID.match(str(path)):
        return _read_hub(str(path))
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found (nor a hub dataset id such as owner/name or owner/name:test)")
    if path.is_dir():
        return _read_saved_dataset(path)
    if not path.is_file():  # a FIFO, a device (/dev/zero), a socket: reading one may never end
        raise DataError(f"{path}: not a regular file (a FIFO or a device is never read); use {FORMATS}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported format '{path.suffix}'; use {FORMATS}")
    if reader is not _read_parquet:
        _check_text(path)
    try:
        return reader(path)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


PROBE_BYTES = 8 << 20  # how much of a text data file is looked at before it is parsed


def _check_text(path: Path) -> None:
    """Refuses, from its first PROBE_BYTES, a file that is not line-based text: NUL bytes (a binary or sparse
    file), or no line break at all (a .jsonl or .csv whose lines would be read whole, however long)."""
    with path.open("rb") as f:
        head = f.read(PROBE_BYTES)
    nul = head.find(b"\0")
    if nul >= 0:
        line = head[:nul].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not a text file (a NUL byte at byte {nul}); a {path.suffix} data file is "
                        "UTF-8 text")
    if path.suffix.lower() != ".json" and len(head) == PROBE_BYTES and b"\n" not in head:
        raise DataError(f"{path}: no line break in its first {PROBE_BYTES >> 20} MB; a {path.suffix} data file has "
                        "one row per line")


def _not_utf8(path: Path) -> DataError:
    """Where in `path` the first byte that is not UTF-8 is, as a DataError (read a line at a time)."""
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                 "save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 in.jsonl > out.jsonl")
    return DataError(f"{path}: not UTF-8 text")


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first row
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                values = json.loads(line)
            except json.JSONDecodeError as e:
                values = Invalid("bad_json", f"not valid JSON ({e.msg} at column {e.colno})")
            except RecursionError:
                values = Invalid("bad_json", "JSON nested too deep to read")
            if not isinstance(values, (dict, Invalid)):
                values = Invalid("bad_json", f"expected a JSON object, found {type(values).__name__}")
            records.append(Record(f"{path}:{line_no}", values))
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json file holds one list of objects, "
                        "use .jsonl for one object per line") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deep to read; a .json file holds one list of objects") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, found {type(data).__name__}")
    return [Record(f"{path} row {i}", v if isinstance(v, dict) else
                   Invalid("bad_json", f"expected an object, found {type(v).__name__}"))
            for i, v in enumerate(data, start=1)]


def _read_csv(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        reader.fieldnames  # reads the header, so that line_num points at it
        line_no = reader.line_num + 1
        for row in reader:
            records.append(Record(f"{path}:{line_no}", {k: v for k, v in row.items() if k is not None}))
            line_no = reader.line_num + 1
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [Record(f"{path} row {i}", row) for i, row in enumerate(rows, start=1)]


def _read_saved_dataset(path: Path) -> list[Record]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: a directory, but not one written by save_to_disk; use {FORMATS}") from None
    if isinstance(ds, DatasetDict):
        splits = ", ".join(ds)
        raise DataError(f"{path}: holds several splits ({splits}); point at one of them, e.g. {path}/{next(iter(ds))}")
    return [Record(f"{path} row {i}", row) for i, row in enumerate(ds, start=1)]


def _read_hub(spec: str) -> list[Record]:
    from datasets import load_dataset

    name, config, split = HUB_ID.match(spec).group("name", "config", "split")
    split = split or "train"
    try:
        ds = load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001  (no network, no such dataset or split: datasets raises many types)
        raise DataError(f"{spec}: not a local file, and loading it as hub dataset {name!r} "
                        f"{f'config {config!r} ' if config else ''}split {split!r} failed: {type(e).__name__}: {e}") from None
    return [Record(f"{spec} row {i}", row) for i, row in enumerate(ds, start=1)]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
SUFFIXES = tuple(READERS)
FORMATS = f"{', '.join(SUFFIXES)}, a save_to_disk directory or a hub dataset id (owner/name[:split])"
