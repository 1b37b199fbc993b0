"""What every loader shares: the report of one file (counts, columns used and unused, skips by reason, token
lengths), every column accounted for, every row validated and measured, and problems raised at their row or
skipped and counted (`data.skip_invalid`): nothing is dropped silently."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from align.data.files import DataError, Invalid, Record, read_records
from align.data.names import AUTO_COLUMNS, CONTENT_HINTS
from align.modeling import conversation_ids

if TYPE_CHECKING:
    from align.recipe import DataConfig, DataFiles

log = logging.getLogger("align.data")


@dataclass
class DataReport:
    """What was read from one file: counts, the columns used, skips by reason, token lengths of what was kept.
    QA data gives one example per row; preference data one pair per row, or several per prompt when rated."""

    path: str
    rows: int = 0
    examples: int = 0  # QA pairs or preference pairs kept
    columns: dict[str, str] = field(default_factory=dict)  # field -> column
    unused: list[str] = field(default_factory=list)  # columns of the file that no field took
    ignored: list[str] = field(default_factory=list)  # unused columns data.columns.ignore calls informational
    passed: list[str] = field(default_factory=list)  # prompts: the other columns, passed to the reward functions
    detected: list[str] = field(default_factory=list)  # fields whose column was auto-detected
    skipped: Counter = field(default_factory=Counter)  # reason -> rows (or pairs: identical, too_long) skipped
    first_skipped: dict[str, str] = field(default_factory=dict)  # reason -> "where: message"
    pairing: dict[str, Any] = field(default_factory=dict)  # rated data: the rule and what it dropped
    labels: dict[str, int] = field(default_factory=dict)  # unpaired feedback: good and bad answers kept
    lengths: dict[str, list[int]] = field(default_factory=dict)  # prompt/completion/... -> tokens per example
    notes: list[str] = field(default_factory=list)  # how rows were read where it is not the usual way (logged)

    def summary(self) -> dict[str, Any]:
        summary = {"path": self.path, "rows": self.rows, "examples": self.examples, "columns": self.columns,
                   "unused_columns": self.unused, "ignored_columns": self.ignored, "skipped": dict(self.skipped)} | (
                       {"passed_to_rewards": self.passed} if self.passed else {})
        return summary | ({"pairing": self.pairing} if self.pairing else {}) | (
            {"labels": self.labels} if self.labels else {}) | ({"notes": self.notes} if self.notes else {})

    def note(self, text: str) -> None:
        log.info("%s: %s", self.path, text)
        self.notes.append(text)


def open_records(path: str) -> tuple[list[Record], DataReport]:
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: the file has no rows")
    return records, DataReport(path=str(path), rows=len(records))


def available(records: list[Record]) -> list[str]:
    """The columns of the file's rows. A file none of whose rows could be read is an error naming the first."""
    if records and not any(isinstance(r.values, dict) for r in records):
        first = records[0]
        raise DataError(f"{first.where}: {first.values.message}; no row of the file could be read "
                        f"({len(records)} tried)")
    return list(dict.fromkeys(k for r in records if isinstance(r.values, dict) for k in r.values))


def account(records: list[Record], report: DataReport, stage: str, ignore: list[str] = ()) -> None:
    """Every column of the file is accounted for: used by a field (logged when auto-detected), or listed as
    unused, with a warning that names the key that would use a column whose name suggests content. Unpaired
    labelled answers (a boolean label column: the KTO shape) are refused: training on them as pairs or as
    targets would teach the bad answers too. Columns in `ignore` (data.columns.ignore) are listed as ignored, not
    warned about."""
    columns = available(records)
    log_detected(report)
    used = {c for v in report.columns.values() for c in (v if isinstance(v, list) else [v])}
    report.ignored = [c for c in columns if c not in used and c in ignore]
    report.unused = [c for c in columns if c not in used and c not in ignore]
    labels = [c for c in report.unused if c.lower() in AUTO_COLUMNS["label"] and
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


def log_detected(report: DataReport) -> None:
    if report.detected:
        log.info("%s: using %s (auto-detected; set data.columns.<field> to choose others)", report.path,
                 ", ".join(f"{n} <- '{report.columns[n]}'" for n in report.detected))


def row_values(record: Record) -> dict:
    if isinstance(record.values, Invalid):
        raise record.values
    return record.values


def attempt(convert, record: Record, *args):
    """convert(values, *args), or the Invalid it raised."""
    try:
        return convert(row_values(record), *args)
    except Invalid as bad:
        return bad


def validated(items, lengths_of, max_length: int, cfg: DataConfig, report: DataReport,
              columns: dict[str, list] | None = None):
    """The valid examples of `items` ((row, where, example or Invalid), any order) that fit in `max_length`
    tokens. Fills the report (skips by reason, token lengths of what is kept); raises DataError at the first
    problem in file order unless `cfg.skip_invalid`. `columns`, filled by `lengths_of` (name -> a value per
    example it measured, e.g. token ids), become columns of the kept examples: tokenised once, here."""
    problems = [(row, where, ex) for row, where, ex in items if isinstance(ex, Invalid)]
    valid = []
    for row, where, ex in items:
        if isinstance(ex, Invalid):
            continue
        size = characters(ex)
        if size > max_length * MAX_CHARACTERS_PER_TOKEN:  # rejected before it is tokenised whole
            problems.append((row, where, Invalid("too_long", f"row is {size} characters, more than "
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
                        f"{counts(report.skipped) or 'no pairs formed'}); the first: {where}: {bad.message}")
    if problems and not cfg.skip_invalid:
        _, where, bad = problems[0]
        fix = "raise the stage's max_length" if bad.reason == "too_long" else "fix the row"
        more = f" ({len(problems) - 1} more problems: {counts(report.skipped)})" if len(problems) > 1 else ""
        raise DataError(f"{where}: {bad.message} — {fix} or set data.skip_invalid=true{more}")
    if problems:
        log.warning("%s: skipped %d of %d rows (%s); first of each: %s", report.path, len(problems), report.rows,
                    counts(report.skipped), "; ".join(report.first_skipped.values()))
    report.examples = len(keep)
    report.lengths = {k: [v[i] for i in keep] for k, v in lengths.items()}
    examples = [valid[i][2] for i in keep]
    for key, values in (columns or {}).items():
        for example, i in zip(examples, keep):
            example[key] = values[i]
    return examples


MAX_CHARACTERS_PER_TOKEN = 100  # far above any tokenizer's average (3-5 for text, under 20 for long runs)


def characters(example: dict) -> int:
    """Characters of text in an example's conversations (prompt, answer, chosen, rejected)."""
    return sum(len(m["content"]) for value in example.values() if isinstance(value, list)
               for m in value if isinstance(m, dict) and isinstance(m.get("content"), str))


def counts(counter: Counter) -> str:
    return ", ".join(f"{reason}={n}" for reason, n in counter.most_common())


def percentiles(values: list[int], qs=(50, 90, 99, 100)) -> list[int]:
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] for q in qs] if ordered else []


def prompt_token_ids(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    """Token ids of each prompt with the generation prompt, as every stage renders it (`modeling.prompt_ids`,
    for a whole file at once)."""
    texts = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def prompt_lengths(tokenizer, examples: list[dict]) -> list[int]:
    """Tokens of each example's prompt with the generation prompt, as every stage renders it."""
    return [len(ids) for ids in prompt_token_ids(tokenizer, [e["prompt"] for e in examples])]


def token_ids(tokenizer, examples: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each example's prompt (with the generation prompt) and of its whole conversation (prompt +
    completion), rendered with the chat template."""
    return (prompt_token_ids(tokenizer, [e["prompt"] for e in examples]),
            conversation_ids(tokenizer, [e["prompt"] + e["completion"] for e in examples]))


def token_lengths(prompts: list[list[int]], conversations: list[list[int]]) -> dict[str, list[int]]:
    """Prompt, completion and total tokens per example from its `token_ids`. The total also counts what a template
    puts after the answer's end of turn (ChatML's newline), which SFT leaves out (`modeling.sft_tokens`): a limit
    checked against it errs by a token on the safe side."""
    total = [len(ids) for ids in conversations]
    prompt = [len(ids) for ids in prompts]
    return {"prompt": prompt, "completion": [t - p for t, p in zip(total, prompt)], "total": total}


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
