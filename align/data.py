"""The user's data: read any supported file, map its columns, validate every row, and count what is skipped.

Formats: .jsonl, .json (a list of objects), .csv, .parquet, and directories written by
`datasets.Dataset.save_to_disk`. Rows are located as `file:line` (jsonl, csv) or `file row N` (the others), and
every problem is reported at that location with the field and the fix. With `data.skip_invalid=true` bad rows are
skipped, counted by reason and logged; nothing is dropped silently.

QA pairs come as prompt + completion columns or as a conversation (`messages`: a list of {role, content} ending
in the assistant's answer). Both become TRL's conversational prompt-completion form, so the chat template renders
every stage's prompts the same way and the loss falls on the answer only.

Preference data comes in three shapes (docs/data.md), all turned into one pair format, {prompt, chosen,
rejected} as messages: explicit prompt + chosen + rejected; chosen/rejected conversations whose common start is
the prompt; and rated responses (several per prompt, each with a score), paired by `data.pair_rule`.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.errors import AlignError
from align.modeling import conversation_ids
from align.recipe import Columns, DataConfig, DataFiles, PairRule

log = logging.getLogger(__name__)

FORMATS = ".jsonl, .json, .csv, .parquet, a save_to_disk directory or a hub dataset id (owner/name[:split])"
AUTO_COLUMNS = {
    "prompt": ("prompt", "question", "instruction", "query"),
    "completion": ("completion", "answer", "response", "output"),
    "messages": ("messages", "conversations", "conversation"),
    "chosen": ("chosen", "preferred", "accepted"),
    "rejected": ("rejected", "dispreferred"),
    "responses": ("responses", "completions", "response", "completion"),
    "scores": ("scores", "ratings", "score", "rating"),
    "input": ("input", "context"),
    "system": ("system",),
    "history": ("history",),
    "label": ("label", "labels", "kto_label", "kto_tag"),
}
PROMPT_PARTS = ("input", "system", "history")  # Alpaca-style columns that join a text prompt
ROLE_KEYS, CONTENT_KEYS = ("role", "from"), ("content", "value", "text")
ROLE_TAGS = {"user": ("user", "human"), "assistant": ("assistant", "gpt", "bot", "model", "chatgpt"),
             "system": ("system",)}
LABEL_COLUMNS = AUTO_COLUMNS["label"]
# owner/name, owner/name:split, owner/name:config:split; a split may be sliced as datasets slices it: test[:500]
HUB_ID = re.compile(r"^(?P<name>[\w.-]+/[\w.-]+)(?::(?P<config>[\w.-]+)(?=:))?(?::(?P<split>[\w.-]+(?:\[[\d:%-]*\])?))?$")
ROLES = ("system", "user", "assistant")


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


@dataclass
class DataReport:
    """What was read from one file: counts, the columns used, skips by reason, token lengths of what was kept.
    QA data gives one example per row; preference data one pair per row, or several per prompt when rated."""

    path: str
    rows: int = 0
    examples: int = 0  # QA pairs or preference pairs kept
    columns: dict[str, str] = field(default_factory=dict)  # field -> column
    unused: list[str] = field(default_factory=list)  # columns of the file that no field took
    passed: list[str] = field(default_factory=list)  # prompts: the other columns, passed to the reward functions
    detected: list[str] = field(default_factory=list)  # fields whose column was auto-detected
    skipped: Counter = field(default_factory=Counter)  # reason -> rows (or pairs: identical, too_long) skipped
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> "where: message"
    pairing: dict[str, Any] = field(default_factory=dict)  # rated data: the rule and what it dropped
    labels: dict[str, int] = field(default_factory=dict)  # unpaired feedback: good and bad answers kept
    lengths: dict[str, list[int]] = field(default_factory=dict)  # prompt/completion/... -> tokens per example

    def summary(self) -> dict[str, Any]:
        summary = {"path": self.path, "rows": self.rows, "examples": self.examples, "columns": self.columns,
                   "unused_columns": self.unused, "skipped": dict(self.skipped)} | (
                       {"passed_to_rewards": self.passed} if self.passed else {})
        return summary | ({"pairing": self.pairing} if self.pairing else {}) | (
            {"labels": self.labels} if self.labels else {})


# -- reading ------------------------------------------------------------------------------------------------


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
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
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
        columns = {"messages": found["messages"]} | resolve_columns(path, available, mapping, ("system",))
    elif {"prompt", "completion"} <= found.keys():
        columns = {"prompt": found["prompt"], "completion": found["completion"]}
        columns |= resolve_columns(path, available, mapping, PROMPT_PARTS)
    else:
        lacking = [n for n in ("prompt", "completion") if n not in found]
        raise DataError(
            f"{path}: cannot tell which column holds the {' and the '.join(lacking)} (columns: {', '.join(available)}); "
            + " ".join(f"set data.columns.{n}=<column>" for n in lacking)
            + " in the recipe, or give a messages column (data.columns.messages)" + looks_like(available, "qa")
        )
    return columns, [name for name in columns if getattr(mapping, name) is None]


def preference_pair_columns(available: list[str]) -> tuple[str, str] | None:
    """The (chosen, rejected) columns a file's names suggest (chosen_messages, rejected_response, ...), if any."""
    chosen = [c for c in available if "chosen" in c.lower() or "preferred" in c.lower()]
    rejected = [c for c in available if "rejected" in c.lower()]
    return (chosen[0], rejected[0]) if chosen and rejected else None


def looks_like(available: list[str], kind: str) -> str:
    """A hint for a file whose columns did not map: the keys to set, for the kind of data they suggest."""
    pair = preference_pair_columns(available)
    if pair and kind == "preference":
        return f"; map them: data.columns.chosen={pair[0]} data.columns.rejected={pair[1]}"
    if pair:
        return (f". The columns look like preference data ({pair[0]}, {pair[1]}), which the reward stage reads "
                f"(data.preference; data.columns.chosen={pair[0]} data.columns.rejected={pair[1]})")
    if kind == "preference":
        return ""
    return (". If the file holds question-answer pairs, map data.columns.prompt and data.columns.completion; "
            "preference pairs, data.columns.prompt, data.columns.chosen and data.columns.rejected (align data check "
            "FILE --kind qa|preference|prompts key=value ... tries a mapping)")


# -- fields -------------------------------------------------------------------------------------------------


def _text(values: dict, column: str) -> str:
    if column not in values or values[column] is None:
        raise Invalid("missing_field", f"field '{column}' is missing")
    value = values[column]
    if not isinstance(value, str):
        raise Invalid("wrong_type", f"field '{column}' is {type(value).__name__} {value!r}, expected text")
    if not value.strip():
        raise Invalid("empty", f"field '{column}' is empty")
    return value


def _messages(value: Any, column: str, keys: Columns) -> list[dict]:
    """A validated list of {role, content} messages (only those two keys kept). Messages may spell their keys and
    roles as ShareGPT does ({from: human|gpt, value}) or as `keys` maps them, and content may be a list of text
    parts ([{type: text, text: ...}], joined by newlines)."""
    if value is None:
        raise Invalid("missing_field", f"field '{column}' is missing")
    if isinstance(value, dict):  # one message, as ShareGPT preference files give chosen and rejected
        value = [value]
    if not isinstance(value, list) or not value:
        raise Invalid("wrong_type", f"field '{column}' is {type(value).__name__}, expected a non-empty list of "
                      "{role, content} messages")
    return [_message(m, i, column, keys) for i, m in enumerate(value, start=1)]


def _message(m: Any, i: int, column: str, keys: Columns) -> dict:
    where = f"field '{column}' message {i}"
    if not isinstance(m, dict):
        raise Invalid("bad_messages", f"{where} is {type(m).__name__} {m!r}, not a message {{role, content}}")
    role_key = keys.role_key or next((k for k in ROLE_KEYS if k in m), "role")
    content_key = keys.content_key or next((k for k in CONTENT_KEYS if k in m), "content")
    tag = m.get(role_key)
    mapped = {r: getattr(keys, f"{r}_tag") for r in ROLES}  # a mapped tag must match exactly; else the usual spellings
    role = next((r for r in ROLES if (tag == mapped[r] if mapped[r] is not None else str(tag).lower() in ROLE_TAGS[r])),
                None)
    if role is None:
        raise Invalid("bad_messages", f"{where} has role {role_key}={tag!r}, which is none of user, assistant, system "
                      f"(nor their usual spellings); map yours with data.columns.user_tag/assistant_tag/system_tag: {m!r}")
    content = _content(m.get(content_key), f"{where} ({content_key})")
    if not content.strip():
        raise Invalid("empty", f"{where} ({role}) is empty")
    return {"role": role, "content": content}


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (OpenAI/HF style); other parts are refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            text = part.get("text", part.get("value")) if isinstance(part, dict) else None
            if kind != "text" or not isinstance(text, str):
                raise Invalid("non_text_content", f"{where} has a {kind!r} part; align trains on text only: drop the "
                              "row (data.skip_invalid=true) or the part")
            texts.append(text)
        return "\n".join(texts)
    raise Invalid("bad_messages", f"{where} is {type(value).__name__} {value!r}, expected text or a list of text parts")


def _prompt(values: dict, columns: dict[str, str], keys: Columns) -> list[dict]:
    """The prompt of a row as messages: its prompt column as text (one user turn; Alpaca: with its input after a
    newline and its history's turns before it) or as messages ending with a user turn."""
    column = columns["prompt"]
    if isinstance(values.get(column), list):
        prompt = _messages(values[column], column, keys)
        if prompt[-1]["role"] != "user":
            raise Invalid("bad_messages", f"field '{column}' must end with a user turn (the prompt to answer)")
        return prompt
    text = _text(values, column)
    extra = values.get(columns["input"]) if "input" in columns else None
    if extra is not None and not isinstance(extra, str):
        raise Invalid("wrong_type", f"field '{columns['input']}' is {type(extra).__name__}, expected text")
    if extra and extra.strip():
        text = f"{text}\n{extra}"
    turns = _history(values.get(columns["history"]), columns["history"]) if "history" in columns else []
    return turns + [{"role": "user", "content": text}]


def _with_system(prompt: list[dict], values: dict, columns: dict[str, str], cfg: DataConfig) -> list[dict]:
    """The prompt with its system message first: the row's own (a system column), else data.system_prompt; a
    prompt that starts with a system turn keeps it."""
    system = values.get(columns["system"]) if "system" in columns else None
    if system is not None and not isinstance(system, str):
        raise Invalid("wrong_type", f"field '{columns['system']}' is {type(system).__name__}, expected text")
    return with_system_prompt(prompt, system if system and system.strip() else cfg.system_prompt)


def _history(value: Any, column: str) -> list[dict]:
    """Alpaca history: [[user, assistant], ...] as messages (None or [] for none)."""
    if not value:
        return []
    if not isinstance(value, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 and
                                              all(isinstance(t, str) and t.strip() for t in p) for p in value):
        raise Invalid("wrong_type", f"field '{column}' must be a list of [user, assistant] text pairs, found {value!r}")
    return [{"role": role, "content": text} for pair in value for role, text in zip(("user", "assistant"), pair)]


def _answer(value: Any, column: str, keys: Columns) -> list[dict]:
    """An answer given as text, as one assistant message, or as assistant messages."""
    if isinstance(value, (list, dict)):
        answer = _messages(value, column, keys)
        other = next((m["role"] for m in answer if m["role"] != "assistant"), None)
        if other:
            raise Invalid("bad_messages", f"field '{column}' holds a {other} turn where an answer (assistant turns "
                          "only) belongs")
        return answer
    return [{"role": "assistant", "content": _text({column: value}, column)}]


def transcript(text: Any, column: str, keys: Columns) -> list[dict]:
    """An Anthropic-HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages."""
    if not isinstance(text, str):
        raise Invalid("wrong_type", f"field '{column}' is {type(text).__name__}, expected a transcript or messages")
    markers = {keys.transcript_user: "user", keys.transcript_assistant: "assistant"}
    pattern = "\n\n(" + "|".join(re.escape(m) for m in markers) + ")"
    parts = re.split(pattern, "\n\n" + text.lstrip("\n"))  # the first turn too follows a blank line
    if parts[0].strip() or len(parts) < 3:
        raise Invalid("bad_messages", f"field '{column}' is not a transcript of '{keys.transcript_user}' and "
                      f"'{keys.transcript_assistant}' turns, each after a blank line (data.columns.transcript_user/"
                      "transcript_assistant set the markers)")
    messages = [{"role": markers[marker], "content": body.strip()} for marker, body in zip(parts[1::2], parts[2::2])]
    if any(not m["content"] for m in messages):
        raise Invalid("empty", f"field '{column}' has an empty turn")
    return messages


def _score(value: Any, column: str) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Invalid("missing_field", f"field '{column}' is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Invalid("wrong_type", f"field '{column}' is {type(value).__name__} {value!r}, expected a number")
    try:
        score = float(value)
    except ValueError:
        raise Invalid("not_a_number", f"field '{column}' is {value!r}, not a number") from None
    if not math.isfinite(score):
        raise Invalid("not_a_number", f"field '{column}' is {value!r}, not a finite number")
    return score


def with_system_prompt(prompt: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and prompt[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *prompt]
    return prompt


# -- QA pairs -----------------------------------------------------------------------------------------------


def qa_example(values: dict, columns: dict[str, str], cfg: DataConfig) -> dict[str, list[dict]]:
    """One row as TRL's conversational prompt-completion example; raises Invalid with the reason."""
    if "messages" in columns:
        column = columns["messages"]
        messages = _messages(values.get(column), column, cfg.columns)
        if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
            raise Invalid("bad_messages", f"field '{column}' must hold a user turn and end with the assistant's answer")
        prompt, completion = messages[:-1], messages[-1:]
    else:
        prompt = _prompt(values, columns, cfg.columns)
        completion = [{"role": "assistant", "content": _text(values, columns["completion"])}]
    return {"prompt": _with_system(prompt, values, columns, cfg), "completion": completion}


def _prompt_lengths(tokenizer, examples: list[dict]) -> list[int]:
    """Tokens of each example's prompt with the generation prompt, as every stage renders it."""
    prompts = tokenizer.apply_chat_template([e["prompt"] for e in examples], add_generation_prompt=True, tokenize=False)
    return [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def token_lengths(tokenizer, examples: list[dict]) -> dict[str, list[int]]:
    """Prompt, completion and total tokens per example, rendered with the chat template. The total also counts what
    a template puts after the answer's end of turn (ChatML's newline), which SFT leaves out (`modeling.sft_example`):
    a limit checked against it errs by a token on the safe side."""
    prompt_len = _prompt_lengths(tokenizer, examples)
    total = [len(ids) for ids in conversation_ids(tokenizer, [e["prompt"] + e["completion"] for e in examples])]
    return {"prompt": prompt_len, "completion": [t - p for t, p in zip(total, prompt_len)], "total": total}


def load_qa(path: str, cfg: DataConfig, tokenizer, max_length: int):
    """QA pairs from `path` as a `datasets.Dataset` of {prompt, completion} messages, and its DataReport.
    Raises DataError at the first invalid row unless `cfg.skip_invalid`; rows longer than `max_length` tokens
    count as invalid ('too_long') rather than being truncated."""
    from datasets import Dataset

    records, report = _open(path)
    report.columns, report.detected = qa_columns(str(path), _available(records), cfg.columns)
    _account(records, report, "SFT")
    items = [(row, record.where, _attempt(qa_example, record, report.columns, cfg))
             for row, record in enumerate(records)]
    examples = _validated(items, lambda ex: token_lengths(tokenizer, ex), max_length, cfg, report)
    return Dataset.from_list(examples), report


# -- preference pairs ---------------------------------------------------------------------------------------


def preference_columns(path: str, available: list[str], mapping: Columns) -> tuple[dict[str, str], list[str]]:
    """Chosen + rejected (+ prompt, optional for conversations), or prompt + responses + scores (rated data)."""
    found = resolve_columns(path, available, mapping,
                            ("prompt", "chosen", "rejected", "responses", "scores", "messages"))
    if "prompt" not in found and "messages" in found:  # ShareGPT preferences: the conversation so far is the prompt
        found["prompt"] = found["messages"]
    if {"chosen", "rejected"} <= found.keys():
        columns = {name: found[name] for name in ("prompt", "chosen", "rejected") if name in found}
    elif {"prompt", "responses", "scores"} <= found.keys():
        columns = {name: found[name] for name in ("prompt", "responses", "scores")}
    else:
        raise DataError(
            f"{path}: cannot tell which columns hold the preferences (columns: {', '.join(available)}); pairs need "
            "data.columns.chosen and data.columns.rejected (and data.columns.prompt unless they are conversations), "
            "rated data needs data.columns.prompt, data.columns.responses and data.columns.scores"
            + looks_like(available, "preference"))
    columns |= resolve_columns(path, available, mapping, PROMPT_PARTS if "prompt" in columns else ("system",))
    return columns, [name for name in columns
                     if getattr(mapping, name) is None and not (name == "prompt" and mapping.messages is not None)]


def pair_example(values: dict, columns: dict[str, str], cfg: DataConfig) -> dict[str, list[dict]]:
    """One chosen/rejected row as {prompt, chosen, rejected} messages. Without a prompt column, chosen and
    rejected must be conversations (or Anthropic-HH transcripts), and the turns they share at the start are the
    prompt; so are they when they are whole conversations next to a prompt column (as in UltraFeedback-style data,
    which has both)."""
    keys = cfg.columns
    chosen_col, rejected_col = columns["chosen"], columns["rejected"]
    if "prompt" in columns and not _is_conversation(values.get(chosen_col), keys):
        prompt = _prompt(values, columns, keys)
        chosen = _answer(values.get(chosen_col), chosen_col, keys)
        rejected = _answer(values.get(rejected_col), rejected_col, keys)
    else:
        whole_chosen, whole_rejected = (
            _messages(values[c], c, keys) if isinstance(values.get(c), (list, dict)) else transcript(values.get(c), c, keys)
            for c in (chosen_col, rejected_col))
        shared = 0
        while shared < min(len(whole_chosen), len(whole_rejected)) and whole_chosen[shared] == whole_rejected[shared]:
            shared += 1
        while shared and whole_chosen[shared - 1]["role"] != "user":  # the prompt ends with the user's turn
            shared -= 1
        prompt, chosen, rejected = whole_chosen[:shared], whole_chosen[shared:], whole_rejected[shared:]
        if not prompt or prompt[-1]["role"] != "user":
            raise Invalid("bad_messages", f"'{chosen_col}' and '{rejected_col}' do not start with the same prompt "
                          "(turns up to a user turn); set data.columns.prompt=<column> if the prompt is in a column "
                          "of its own")
        chosen, rejected = _answer(chosen or None, chosen_col, keys), _answer(rejected or None, rejected_col, keys)
    if chosen == rejected:
        raise Invalid("identical", f"fields '{chosen_col}' and '{rejected_col}' hold the same answer")
    return {"prompt": _with_system(prompt, values, columns, cfg), "chosen": chosen, "rejected": rejected}


def _is_conversation(value: Any, keys: Columns) -> bool:
    """Whether an answer column holds a whole conversation (it starts with a user or system turn)."""
    if not isinstance(value, list) or not value:
        return False
    try:
        return _message(value[0], 1, "", keys)["role"] != "assistant"
    except Invalid:
        return False


@dataclass
class Rated:
    """The responses to one prompt, each with its score and where it was read."""

    prompt: list[dict]
    responses: list[tuple[list[dict], float, int, str]] = field(default_factory=list)  # (answer, score, row, where)


def _rated_prompts(records: list[Record], columns: dict[str, str], cfg: DataConfig):
    """Rated rows grouped by prompt, and the rows that could not be read: a row holds either lists of responses
    and scores, or one response and its score (rows with the same prompt are then one group)."""
    groups: dict[str, Rated] = {}
    problems = []
    for row, record in enumerate(records):
        try:
            values = _values(record)
            prompt = _with_system(_prompt(values, columns, cfg.columns), values, columns, cfg)
            responses, scores = values.get(columns["responses"]), values.get(columns["scores"])
            if isinstance(responses, list) and responses and not isinstance(responses[0], dict):
                if not isinstance(scores, list) or len(scores) != len(responses):
                    raise Invalid("wrong_type", f"field '{columns['scores']}' must be a list with one score per "
                                  f"response ({len(responses)}), found {scores!r}")
                items = [(_answer(r, columns["responses"], cfg.columns), _score(x, columns["scores"]))
                         for r, x in zip(responses, scores)]
            else:
                items = [(_answer(responses, columns["responses"], cfg.columns), _score(scores, columns["scores"]))]
        except Invalid as bad:
            problems.append((row, record.where, bad))
            continue
        group = groups.setdefault(json.dumps(prompt), Rated(prompt))
        group.responses.extend((answer, score, row, record.where) for answer, score in items)
    return list(groups.values()), problems


def rated_pairs(group: Rated, rule: PairRule, pairing: Counter):
    """Pairs of one prompt's responses by `rule`, as (row, where, example or Invalid). The best-scored response
    (the first, if several share the top score) is chosen; responses tied with it are dropped and counted."""
    if len(group.responses) < 2:
        pairing["single_response"] += 1
        return []
    best = max(group.responses, key=lambda r: r[1])  # the first of the top score
    ties = [r for r in group.responses if r[1] == best[1] and r is not best]
    pairing["tied_with_best"] += len(ties)
    worse = [r for r in group.responses if r[1] < best[1]]  # file order
    if rule == PairRule.best_vs_worst and worse:
        worse = [min(worse, key=lambda r: r[1])]
    pairs = []
    for answer, _, row, where in worse:
        example = {"prompt": group.prompt, "chosen": best[0], "rejected": answer}
        if answer == best[0]:
            example = Invalid("identical", f"response scored {best[1]:g} ({best[3]}) and this one hold the same text")
        pairs.append((row, where, example))
    return pairs


def pair_token_ids(tokenizer, examples: list[dict]) -> dict[str, list]:
    """Token ids of every pair's chosen and rejected conversation (as the reward model sees them) and the
    token lengths of prompt, chosen and rejected answers."""
    prompt_len = _prompt_lengths(tokenizer, examples)
    chosen = conversation_ids(tokenizer, [e["prompt"] + e["chosen"] for e in examples])
    rejected = conversation_ids(tokenizer, [e["prompt"] + e["rejected"] for e in examples])
    return {
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "prompt": prompt_len,
        "chosen": [len(c) - p for c, p in zip(chosen, prompt_len)],
        "rejected": [len(r) - p for r, p in zip(rejected, prompt_len)],
        "total": [max(len(c), len(r)) for c, r in zip(chosen, rejected)],
    }


def load_preferences(path: str, cfg: DataConfig, tokenizer, max_length: int):
    """Preference pairs from `path` as a `datasets.Dataset` of {prompt, chosen, rejected} messages plus their
    token ids (chosen_ids, rejected_ids; TRL's RewardTrainer trains on these as they are), and its DataReport.
    Errors and skips as in `load_qa`; a pair whose longer side exceeds `max_length` tokens is 'too_long'."""
    from datasets import Dataset

    records, report = _open(path)
    report.columns, report.detected = preference_columns(str(path), _available(records), cfg.columns)
    _account(records, report, "reward model")
    if "scores" in report.columns:
        groups, items = _rated_prompts(records, report.columns, cfg)
        pairing = Counter()
        for group in groups:
            items.extend(rated_pairs(group, cfg.pair_rule, pairing))
        report.pairing = {"rule": cfg.pair_rule.value, "prompts": len(groups), **pairing}
        log.info("%s: %d prompts with rated responses -> pairs by %s; dropped: %d responses tied with the best, "
                 "%d prompts with a single response", path, len(groups), cfg.pair_rule.value,
                 pairing["tied_with_best"], pairing["single_response"])
    else:
        items = [(row, record.where, _attempt(pair_example, record, report.columns, cfg))
                 for row, record in enumerate(records)]
    token_ids: dict[str, list] = {}

    def lengths(examples):
        token_ids.update(pair_token_ids(tokenizer, examples))
        return {k: token_ids[k] for k in ("prompt", "chosen", "rejected", "total")}

    examples = _validated(items, lengths, max_length, cfg, report, ids=token_ids)
    return Dataset.from_list(examples), report


# -- unpaired feedback (KTO) --------------------------------------------------------------------------------


def feedback_columns(path: str, available: list[str], mapping: Columns) -> tuple[dict[str, str], list[str]]:
    """A question-answer file's columns (`qa_columns`) and a label column: true for a good answer, false for a bad
    one (TRL's unpaired preference type, LLaMA-Factory's kto_tag)."""
    columns, detected = qa_columns(path, available, mapping)
    label = resolve_columns(path, available, mapping, ("label",))
    if not label:
        raise DataError(f"{path}: cannot tell which column labels each answer good or bad (columns: "
                        f"{', '.join(available)}); set data.columns.label=<column> (true: a good answer, false: a bad "
                        "one)")
    return columns | label, detected + (["label"] if mapping.label is None else [])


def feedback_example(values: dict, columns: dict[str, str], cfg: DataConfig) -> dict[str, Any]:
    """One row as TRL's conversational unpaired-preference example {prompt, completion, label}."""
    label = values.get(columns["label"])
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # CSV cells are text
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        raise Invalid("bad_label", f"field '{columns['label']}' is {label!r}; expected true (a good answer) or "
                      "false (a bad one)")
    return {**qa_example(values, columns, cfg), "label": label}


def load_feedback(path: str, cfg: DataConfig, tokenizer, max_length: int):
    """Answers labelled good or bad one at a time from `path` as a `datasets.Dataset` of {prompt, completion,
    label}, and its DataReport (`report.labels`: how many of each). Errors and skips as in `load_qa`."""
    from datasets import Dataset

    records, report = _open(path)
    report.columns, report.detected = feedback_columns(str(path), _available(records), cfg.columns)
    _account(records, report, "KTO")
    items = [(row, record.where, _attempt(feedback_example, record, report.columns, cfg))
             for row, record in enumerate(records)]
    examples = _validated(items, lambda ex: token_lengths(tokenizer, ex), max_length, cfg, report)
    good = sum(e["label"] for e in examples)
    report.labels = {"good": good, "bad": len(examples) - good}
    if examples and not (good and len(examples) - good):
        raise DataError(f"{path}: every answer is labelled {'good' if good else 'bad'}; KTO needs answers of both "
                        "kinds to tell them apart")
    return Dataset.from_list(examples), report


# -- prompts for RL ------------------------------------------------------------------------------------------

# Names TRL gives its own arguments of a reward function; a data column with one of them would be shadowed.
RESERVED_COLUMNS = ("completion", "completion_ids", "completions", "prompts", "trainer_state", "log_extra",
                    "log_metric", "environments")


def prompt_columns(path: str, available: list[str], mapping: Columns) -> tuple[dict[str, str], list[str]]:
    """The prompt column (text, or messages ending in a user turn); every other column is passed along."""
    found = resolve_columns(path, available, mapping, ("prompt", "messages"))
    name = "prompt" if "prompt" in found else "messages" if "messages" in found else None
    if name is None:
        raise DataError(f"{path}: cannot tell which column holds the prompt (columns: {', '.join(available)}); "
                        "set data.columns.prompt=<column>" + looks_like(available, "prompts"))
    clash = sorted(set(available) & set(RESERVED_COLUMNS))
    if clash:
        raise DataError(f"{path}: column '{clash[0]}' has a name TRL uses for its own reward-function arguments, so "
                        "the reward functions would never see it; rename the column (e.g. to 'reference')")
    columns = {"prompt": found[name]} | resolve_columns(path, available, mapping, PROMPT_PARTS)
    return columns, [n for n in columns if getattr(mapping, "messages" if n == "prompt" and name == "messages" else n) is None]


def prompt_example(values: dict, columns: dict[str, str], cfg: DataConfig) -> dict[str, Any]:
    """One row as {prompt: messages, <every other column>: its value}."""
    prompt = _with_system(_prompt(values, columns, cfg.columns), values, columns, cfg)
    return {"prompt": prompt, **{k: v for k, v in values.items() if k != columns["prompt"]}}


def load_prompts(path: str, cfg: DataConfig, tokenizer, max_length: int):
    """Prompts from `path` as a `datasets.Dataset` of {prompt: messages, other columns as they are}, and its
    DataReport. Errors and skips as in `load_qa`; a prompt longer than `max_length` tokens (with the generation
    prompt) is 'too_long'."""
    from datasets import Dataset

    records, report = _open(path)
    report.columns, report.detected = prompt_columns(str(path), _available(records), cfg.columns)
    report.passed = [c for c in _available(records) if c != report.columns["prompt"]]
    _log_detected(report)
    items = [(row, record.where, _attempt(prompt_example, record, report.columns, cfg))
             for row, record in enumerate(records)]

    def lengths(examples):
        tokens = _prompt_lengths(tokenizer, examples)
        return {"prompt": tokens, "total": tokens}

    examples = _validated(items, lengths, max_length, cfg, report)
    return Dataset.from_list(examples), report


def load_train_eval(files: DataFiles, load, cfg: DataConfig, tokenizer, max_length: int, *, what: str):
    """A stage's train and held-out data through `load` (load_qa, load_preferences): (train, held-out or None,
    reports). `what` names the recipe key for the error when no training file is set."""
    if files.train is None:
        raise DataError(f"data.{what}.train is not set; point it at a file (see docs/data.md)")
    train, report = load(files.train, cfg, tokenizer, max_length)
    if files.eval is None:
        return train, None, [report]
    held_out, held_out_report = load(files.eval, cfg, tokenizer, max_length)
    return train, held_out, [report, held_out_report]


# -- shared by every loader ---------------------------------------------------------------------------------


def _open(path: str) -> tuple[list[Record], DataReport]:
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: the file has no rows")
    return records, DataReport(path=str(path), rows=len(records))


def _available(records: list[Record]) -> list[str]:
    """The columns of the file's rows. A file none of whose rows could be read is an error naming the first."""
    if records and not any(isinstance(r.values, dict) for r in records):
        first = records[0]
        raise DataError(f"{first.where}: {first.values.message}; no row of the file could be read "
                        f"({len(records)} tried)")
    return list(dict.fromkeys(k for r in records if isinstance(r.values, dict) for k in r.values))


# What an unused column with one of these names probably holds, and the key that would use it.
CONTENT_HINTS = {"input": "data.columns.input", "context": "data.columns.input", "system": "data.columns.system",
                 "history": "data.columns.history", "instruction": "data.columns.prompt",
                 "question": "data.columns.prompt", "prompt": "data.columns.prompt", "query": "data.columns.prompt",
                 "response": "data.columns.completion", "output": "data.columns.completion",
                 "answer": "data.columns.completion", "conversations": "data.columns.messages",
                 "messages": "data.columns.messages"}


def _account(records: list[Record], report: DataReport, stage: str) -> None:
    """Every column of the file is accounted for: used by a field (logged when auto-detected), or listed as
    unused, with a warning that names the key that would use a column whose name suggests content. Unpaired
    labelled answers (a boolean label column: the KTO shape) are refused: training on them as pairs or as
    targets would teach the bad answers too."""
    available = _available(records)
    _log_detected(report)
    report.unused = [c for c in available if c not in report.columns.values()]
    labels = [c for c in report.unused if c.lower() in LABEL_COLUMNS and
              all(isinstance(r.values.get(c), bool) for r in records if isinstance(r.values, dict) and c in r.values)]
    if labels:
        raise DataError(f"{report.path}: column '{labels[0]}' labels each answer good (true) or bad (false) on its "
                        f"own: unpaired feedback (the KTO shape), which the {stage} stage cannot train on (it would "
                        "learn the bad answers too). `align kto` trains on it (data.feedback); for SFT keep only the "
                        "rows labelled true; for a reward model or DPO, pair a good and a bad answer to the same "
                        "prompt as chosen/rejected (docs/data.md)")
    if report.unused:
        hints = [f"'{c}' (set {CONTENT_HINTS[c.lower()]}={c} to use it)" for c in report.unused
                 if c.lower() in CONTENT_HINTS]
        log.warning("%s: column%s not used: %s%s", report.path, "s" * (len(report.unused) > 1),
                    ", ".join(report.unused), f"; it may hold content: {', '.join(hints)}" if hints else "")


def _log_detected(report: DataReport) -> None:
    if report.detected:
        log.info("%s: using %s (auto-detected; set data.columns.<field> to choose others)", report.path,
                 ", ".join(f"{n} <- '{report.columns[n]}'" for n in report.detected))


def _values(record: Record) -> dict:
    if isinstance(record.values, Invalid):
        raise record.values
    return record.values


def _attempt(convert, record: Record, *args):
    """convert(values, *args), or the Invalid it raised."""
    try:
        return convert(_values(record), *args)
    except Invalid as bad:
        return bad


def _validated(items, lengths_of, max_length: int, cfg: DataConfig, report: DataReport, ids: dict | None = None):
    """The valid examples of `items` ((row, where, example or Invalid), any order) that fit in `max_length`
    tokens. Fills the report (skips by reason, token lengths of what is kept); raises DataError at the first
    problem in file order unless `cfg.skip_invalid`. `ids`, filled by `lengths_of`, holds per-example token ids
    to attach to the kept examples."""
    problems = [(row, where, ex) for row, where, ex in items if isinstance(ex, Invalid)]
    valid = []
    for row, where, ex in items:
        if isinstance(ex, Invalid):
            continue
        characters = _characters(ex)
        if characters > max_length * MAX_CHARACTERS_PER_TOKEN:  # rejected before it is tokenised whole
            problems.append((row, where, Invalid("too_long", f"row is {characters} characters, more than "
                             f"max_length={max_length} tokens can hold (at {MAX_CHARACTERS_PER_TOKEN} characters a token)")))
        else:
            valid.append((row, where, ex))
    lengths = lengths_of([ex for _, _, ex in valid]) if valid else {}
    keep = []
    for i, (row, where, _) in enumerate(valid):
        total = lengths["total"][i]
        if total > max_length:
            problems.append((row, where, Invalid("too_long", f"row is {total} tokens, longer than max_length={max_length}")))
        else:
            keep.append(i)
    problems.sort(key=lambda p: p[0])  # file order

    for _, where, bad in problems:
        report.skipped[bad.reason] += 1
        report.first_skipped.setdefault(bad.reason, f"{where}: {bad.message}")
    if not keep:  # skipping would leave nothing either: the file, or its mapping, is what needs fixing
        _, where, bad = problems[0] if problems else (None, report.path, Invalid("", "no pairs formed"))
        raise DataError(f"{report.path}: no row is usable ({report.rows} rows read: "
                        f"{_counts(report.skipped) or 'no pairs formed'}); the first: {where}: {bad.message}")
    if problems and not cfg.skip_invalid:
        _, where, bad = problems[0]
        fix = "raise the stage's max_length" if bad.reason == "too_long" else "fix the row"
        more = f" ({len(problems) - 1} more problems: {_counts(report.skipped)})" if len(problems) > 1 else ""
        raise DataError(f"{where}: {bad.message} — {fix} or set data.skip_invalid=true{more}")
    if problems:
        log.warning("%s: skipped %d of %d rows (%s); first of each: %s", report.path, len(problems), report.rows,
                    _counts(report.skipped), "; ".join(report.first_skipped.values()))
    report.examples = len(keep)
    report.lengths = {k: [v[i] for i in keep] for k, v in lengths.items()}
    examples = [valid[i][2] for i in keep]
    for key, values in (ids or {}).items():
        if key.endswith("_ids"):
            for example, i in zip(examples, keep):
                example[key] = values[i]
    return examples


MAX_CHARACTERS_PER_TOKEN = 100  # far above any tokenizer's average (3-5 for text, under 20 for long runs)


def _characters(example: dict) -> int:
    """Characters of text in an example's conversations (prompt, answer, chosen, rejected)."""
    return sum(len(m["content"]) for value in example.values() if isinstance(value, list)
               for m in value if isinstance(m, dict) and isinstance(m.get("content"), str))


def _counts(counter: Counter) -> str:
    return ", ".join(f"{reason}={n}" for reason, n in counter.most_common())


def percentiles(values: list[int], qs=(50, 90, 99, 100)) -> list[int]:
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] for q in qs] if ordered else []


# -- the kinds of data, declared once --------------------------------------------------------------------------

# kind -> (its data.<section>, its loader); `align data check` and the stages read files through these.
KINDS = {"qa": ("sft", load_qa), "preference": ("preference", load_preferences),
         "feedback": ("feedback", load_feedback), "prompts": ("prompts", load_prompts)}
