"""The user's data: read any supported file, map its columns, validate every row, and count what is skipped.

Formats: .jsonl, .json (a list of objects), .csv, .parquet, and directories written by
`datasets.Dataset.save_to_disk`. Rows are located as `file:line` (jsonl, csv) or `file row N` (the others), and
every problem is reported at that location with the field and the fix. With `data.skip_invalid=true` bad rows are
skipped, counted by reason and logged; nothing is dropped silently.

QA pairs come as prompt + completion columns or as a conversation (`messages`: a list of {role, content} ending
in the assistant's answer). Both become TRL's conversational prompt-completion form, so the chat template renders
every stage's prompts the same way and the loss falls on the answer only.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.errors import AlignError
from align.recipe import Columns, DataConfig

log = logging.getLogger(__name__)

FORMATS = ".jsonl, .json, .csv, .parquet or a save_to_disk directory"
AUTO_COLUMNS = {
    "prompt": ("prompt", "question", "instruction", "query"),
    "completion": ("completion", "answer", "response", "output"),
    "messages": ("messages", "conversations", "conversation"),
}
ROLES = ("system", "user", "assistant")


class DataError(AlignError, ValueError):
    """Data that cannot be used as it is; the message names the file, the row, the field and the fix."""


@dataclass
class Record:
    where: str  # "data/qa.jsonl:17" or "data/qa.parquet row 17"
    values: dict[str, Any]


@dataclass
class Invalid(Exception):
    reason: str  # short counter key: empty, missing_field, wrong_type, bad_messages, bad_json, too_long
    message: str


@dataclass
class DataReport:
    """What was read from one file: counts, the columns used, skips by reason, token lengths of kept rows."""

    path: str
    rows: int = 0
    columns: dict[str, str] = field(default_factory=dict)  # field -> column
    detected: list[str] = field(default_factory=list)  # fields whose column was auto-detected
    skipped: Counter = field(default_factory=Counter)
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> "where: message"
    lengths: dict[str, list[int]] = field(default_factory=dict)  # prompt/completion/total -> tokens per kept row

    @property
    def kept(self) -> int:
        return self.rows - sum(self.skipped.values())

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "kept": self.kept, "columns": self.columns,
                "skipped": dict(self.skipped)}


# -- reading ------------------------------------------------------------------------------------------------


def read_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        return _read_saved_dataset(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported format '{path.suffix}'; use {FORMATS}")
    return reader(path)


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                values = json.loads(line)
            except json.JSONDecodeError as e:
                values = Invalid("bad_json", f"not valid JSON ({e.msg} at column {e.colno})")
            if not isinstance(values, (dict, Invalid)):
                values = Invalid("bad_json", f"expected a JSON object, found {type(values).__name__}")
            records.append(Record(f"{path}:{line_no}", values))
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json file holds one list of objects, "
                        "use .jsonl for one object per line") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, found {type(data).__name__}")
    return [Record(f"{path} row {i}", v if isinstance(v, dict) else
                   Invalid("bad_json", f"expected an object, found {type(v).__name__}"))
            for i, v in enumerate(data, start=1)]


def _read_csv(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8", newline="") as f:
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


# -- columns ------------------------------------------------------------------------------------------------


def resolve_columns(path: str, available: list[str], mapping: Columns, fields: tuple[str, ...]) -> dict[str, str]:
    """Column for each of `fields`: the recipe's mapping where set (and present), else the first common name found."""
    resolved = {}
    for name in fields:
        wanted = getattr(mapping, name)
        if wanted is not None:
            if wanted not in available:
                close = difflib.get_close_matches(wanted, available, n=1)
                raise DataError(
                    f"{path}: data.columns.{name} is '{wanted}', but the file has no such column "
                    f"(columns: {', '.join(available)})" + (f"; did you mean '{close[0]}'?" if close else "")
                )
            resolved[name] = wanted
        else:
            found = next((c for c in AUTO_COLUMNS[name] if c in available), None)
            if found is not None:
                resolved[name] = found
    return resolved


def qa_columns(path: str, available: list[str], mapping: Columns) -> tuple[dict[str, str], list[str]]:
    """Prompt + completion columns, or a messages column; returns (columns, fields that were auto-detected)."""
    found = resolve_columns(path, available, mapping, ("prompt", "completion", "messages"))
    explicit = {name for name in found if getattr(mapping, name) is not None}
    # A messages column wins when it was mapped, or when no prompt/completion pair was mapped or found.
    pair_wanted = bool({"prompt", "completion"} & explicit) or {"prompt", "completion"} <= found.keys()
    if "messages" in found and ("messages" in explicit or not pair_wanted):
        columns = {"messages": found["messages"]}
    elif {"prompt", "completion"} <= found.keys():
        columns = {"prompt": found["prompt"], "completion": found["completion"]}
    else:
        lacking = [n for n in ("prompt", "completion") if n not in found]
        raise DataError(
            f"{path}: cannot tell which column holds the {' and the '.join(lacking)} (columns: {', '.join(available)}); "
            + " ".join(f"set data.columns.{n}=<column>" for n in lacking)
            + " in the recipe, or give a messages column (data.columns.messages)"
        )
    return columns, [name for name in columns if name not in explicit]


# -- validation ---------------------------------------------------------------------------------------------


def _text(values: dict, column: str) -> str:
    if column not in values or values[column] is None:
        raise Invalid("missing_field", f"field '{column}' is missing")
    value = values[column]
    if not isinstance(value, str):
        raise Invalid("wrong_type", f"field '{column}' is {type(value).__name__} {value!r}, expected text")
    if not value.strip():
        raise Invalid("empty", f"field '{column}' is empty")
    return value


def _messages(values: dict, column: str) -> list[dict]:
    if column not in values or values[column] is None:
        raise Invalid("missing_field", f"field '{column}' is missing")
    messages = values[column]
    if not isinstance(messages, list) or not messages:
        raise Invalid("wrong_type", f"field '{column}' is {type(messages).__name__}, expected a non-empty list of "
                      "{role, content} messages")
    clean = []
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise Invalid("bad_messages", f"field '{column}' message {i} is not {{role: system|user|assistant, "
                          f"content: text}}: {m!r}")
        if not m["content"].strip():
            raise Invalid("empty", f"field '{column}' message {i} ({m['role']}) is empty")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in clean):
        raise Invalid("bad_messages", f"field '{column}' must hold a user turn and end with the assistant's answer")
    return clean


def qa_example(values: dict, columns: dict[str, str], system_prompt: str | None) -> dict[str, list[dict]]:
    """One row as TRL's conversational prompt-completion example; raises Invalid with the reason."""
    if "messages" in columns:
        messages = _messages(values, columns["messages"])
        prompt, completion = messages[:-1], messages[-1:]
    else:
        prompt = [{"role": "user", "content": _text(values, columns["prompt"])}]
        completion = [{"role": "assistant", "content": _text(values, columns["completion"])}]
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return {"prompt": prompt, "completion": completion}


def token_lengths(tokenizer, examples: list[dict]) -> dict[str, list[int]]:
    """Prompt, completion and total tokens per example, rendered with the chat template exactly as TRL trains."""
    prompts = tokenizer.apply_chat_template([e["prompt"] for e in examples], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([e["prompt"] + e["completion"] for e in examples], tokenize=False)
    encode = lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    prompt_len, total = encode(prompts), encode(full)
    return {"prompt": prompt_len, "completion": [t - p for t, p in zip(total, prompt_len)], "total": total}


def load_qa(path: str, cfg: DataConfig, tokenizer, max_length: int):
    """QA pairs from `path` as a `datasets.Dataset` of {prompt, completion} messages, and its DataReport.
    Raises DataError at the first invalid row unless `cfg.skip_invalid`; rows longer than `max_length` tokens
    count as invalid ('too_long') rather than being truncated."""
    from datasets import Dataset

    records = read_records(path)
    if not records:
        raise DataError(f"{path}: the file has no rows")
    available = list(dict.fromkeys(k for r in records if isinstance(r.values, dict) for k in r.values))
    report = DataReport(path=str(path), rows=len(records))
    columns, report.detected = qa_columns(str(path), available, cfg.columns)
    report.columns = columns
    if report.detected:
        log.info("%s: using %s (auto-detected; set data.columns.<field> to choose others)", path,
                 ", ".join(f"{n} <- '{columns[n]}'" for n in report.detected))

    examples, rows_of_examples, problems = [], [], []  # problems: (row index, where, Invalid)
    for row, record in enumerate(records):
        try:
            if isinstance(record.values, Invalid):
                raise record.values
            examples.append(qa_example(record.values, columns, cfg.system_prompt))
            rows_of_examples.append(row)
        except Invalid as bad:
            problems.append((row, record.where, bad))
    lengths = token_lengths(tokenizer, examples) if examples else {"prompt": [], "completion": [], "total": []}
    keep = []
    for i, (row, total) in enumerate(zip(rows_of_examples, lengths["total"])):
        if total > max_length:
            message = f"row is {total} tokens, longer than max_length={max_length}"
            problems.append((row, records[row].where, Invalid("too_long", message)))
        else:
            keep.append(i)
    problems = [(where, bad) for _, where, bad in sorted(problems, key=lambda p: p[0])]  # in file order

    for where, bad in problems:
        report.skipped[bad.reason] += 1
        report.first_skipped.setdefault(bad.reason, f"{where}: {bad.message}")
    if problems and not cfg.skip_invalid:
        where, bad = problems[0]
        fix = "raise the stage's max_length" if bad.reason == "too_long" else "fix the row"
        more = f" ({len(problems) - 1} more invalid rows: {_counts(report.skipped)})" if len(problems) > 1 else ""
        raise DataError(f"{where}: {bad.message} — {fix} or set data.skip_invalid=true{more}")
    if problems:
        log.warning("%s: skipped %d of %d rows (%s); first of each: %s", path, len(problems), report.rows,
                    _counts(report.skipped), "; ".join(report.first_skipped.values()))
    if not keep:
        raise DataError(f"{path}: no usable rows ({report.rows} read, {_counts(report.skipped) or 'file is empty'})")
    report.lengths = {k: [v[i] for i in keep] for k, v in lengths.items()}
    return Dataset.from_list([examples[i] for i in keep]), report


def _counts(counter: Counter) -> str:
    return ", ".join(f"{reason}={n}" for reason, n in counter.most_common())


def percentiles(values: list[int], qs=(50, 90, 99, 100)) -> list[int]:
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] for q in qs] if ordered else []
