"""Question-answer pairs (the SFT stage): prompt + completion columns, Alpaca's instruction + input + output, or a
conversation (`messages`) ending in the assistant's answer; prompt and completion may each be text or messages
(TRL's standard and conversational prompt-completion types). Every row becomes TRL's conversational
prompt-completion form, so the chat template renders every stage's prompts the same way and the loss falls on the
answer only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from align.data.checks import account, attempt, available, open_records, token_ids, token_lengths, validated
from align.data.columns import looks_like, resolve_columns
from align.data.fields import answer_messages, messages_field, prompt_messages, with_system
from align.data.files import DataError, Invalid
from align.data.names import PROMPT_PARTS
from align.modeling import sft_tokens

if TYPE_CHECKING:
    from align.recipe import Columns, DataConfig


def columns(path: str, names: list[str], mapping: Columns) -> tuple[dict[str, str], list[str]]:
    """Prompt + completion columns, or a messages column; returns (columns, fields that were auto-detected)."""
    found = resolve_columns(path, names, mapping, ("prompt", "completion", "messages"))
    explicit = {name for name in found if getattr(mapping, name) is not None}
    # A messages column wins when it was mapped, or when no prompt/completion pair was mapped or found.
    pair_wanted = bool({"prompt", "completion"} & explicit) or {"prompt", "completion"} <= found.keys()
    if "messages" in found and ("messages" in explicit or not pair_wanted):
        resolved = {"messages": found["messages"]}
        resolved |= resolve_columns(path, names, mapping, ("system",), resolved)
    elif {"prompt", "completion"} <= found.keys():
        resolved = {"prompt": found["prompt"], "completion": found["completion"]}
        resolved |= resolve_columns(path, names, mapping, PROMPT_PARTS, resolved)
    elif "text" in names and not found:
        # TRL's language-modeling type. align's SFT trains answers to prompts (docs/data.md says why not raw text).
        raise DataError(
            f"{path}: a 'text' column alone is language-modeling data (TRL's language modeling type: every token "
            "trained), and align's SFT trains the answer to a prompt, with the loss on the answer only. Split each "
            "text into a prompt column and a completion column (data.columns.prompt, data.columns.completion), or "
            "give a messages column of {role, content} turns ending in the assistant's answer")
    else:
        lacking = [n for n in ("prompt", "completion") if n not in found]
        raise DataError(
            f"{path}: cannot tell which column holds the {' and the '.join(lacking)} (columns: {', '.join(names)}); "
            + " ".join(f"set data.columns.{n}=<column>" for n in lacking)
            + " in the recipe, or give a messages column (data.columns.messages)" + looks_like(names, "qa"))
    return resolved, [name for name in resolved if getattr(mapping, name) is None]


def example(values: dict, columns: dict[str, str], cfg: DataConfig) -> dict[str, list[dict]]:
    """One row as TRL's conversational prompt-completion example; raises Invalid with the reason."""
    if "messages" in columns:
        column = columns["messages"]
        messages = messages_field(values.get(column), column, cfg.columns)
        if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages):
            raise Invalid("bad_messages", f"field '{column}' must hold a user turn and end with the assistant's answer")
        prompt, completion = messages[:-1], messages[-1:]
    else:
        prompt = prompt_messages(values, columns, cfg.columns)
        completion = answer_messages(values.get(columns["completion"]), columns["completion"], cfg.columns)
    return {"prompt": with_system(prompt, values, columns, cfg), "completion": completion}


def load(path: str, cfg: DataConfig, tokenizer, max_length: int):
    """QA pairs from `path` as a `datasets.Dataset` of {prompt, completion} messages with the token ids and answer
    mask SFT trains on (input_ids, completion_mask: `modeling.sft_tokens`), and its DataReport.
    Raises DataError at the first invalid row unless `cfg.skip_invalid`; rows longer than `max_length` tokens
    count as invalid ('too_long') rather than being truncated."""
    from datasets import Dataset

    records, report = open_records(path)
    report.columns, report.detected = columns(str(path), available(records), cfg.columns)
    account(records, report, "SFT", cfg.columns.ignore)
    items = [(row, record.where, attempt(example, record, report.columns, cfg)) for row, record in enumerate(records)]
    trained: dict[str, list] = {}

    def lengths(examples):
        prompts, conversations = token_ids(tokenizer, examples)
        rows = [sft_tokens(p, c, tokenizer.eos_token_id) for p, c in zip(prompts, conversations)]
        trained.update(input_ids=[r["input_ids"] for r in rows], completion_mask=[r["completion_mask"] for r in rows])
        return token_lengths(prompts, conversations)

    examples = validated(items, lengths, max_length, cfg, report, columns=trained)
    return Dataset.from_list(examples), report
