"""One row's fields as messages: text, conversations (with their key and role spellings), Alpaca prompts,
answers, Anthropic-HH transcripts, the prompt two answers share, scores. Each raises `Invalid` with the reason
and the field, which the loaders count or report at the row's location."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from align.data.files import Invalid
from align.data.names import CONTENT_KEYS, ROLE_KEYS, ROLE_TAGS, ROLES

if TYPE_CHECKING:
    from align.recipe import Columns, DataConfig


def text_field(values: dict, column: str) -> str:
    if column not in values or values[column] is None:
        raise Invalid("missing_field", f"field '{column}' is missing")
    value = values[column]
    if not isinstance(value, str):
        raise Invalid("wrong_type", f"field '{column}' is {type(value).__name__} {value!r}, expected text")
    if not value.strip():
        raise Invalid("empty", f"field '{column}' is empty")
    return value


def messages_field(value: Any, column: str, keys: Columns) -> list[dict]:
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
    return [message_field(m, i, column, keys) for i, m in enumerate(value, start=1)]


def message_field(m: Any, i: int, column: str, keys: Columns) -> dict:
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
    content = content_field(m.get(content_key), f"{where} ({content_key})")
    if not content.strip():
        raise Invalid("empty", f"{where} ({role}) is empty")
    return {"role": role, "content": content}


def content_field(value: Any, where: str) -> str:
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


def prompt_messages(values: dict, columns: dict[str, str], keys: Columns) -> list[dict]:
    """The prompt of a row as messages: its prompt column as text (one user turn; Alpaca: with its input after a
    newline and its history's turns before it) or as messages ending with a user turn."""
    column = columns["prompt"]
    if isinstance(values.get(column), list):
        prompt = messages_field(values[column], column, keys)
        if prompt[-1]["role"] != "user":
            raise Invalid("bad_messages", f"field '{column}' must end with a user turn (the prompt to answer)")
        return prompt
    text = text_field(values, column)
    extra = values.get(columns["input"]) if "input" in columns else None
    if extra is not None and not isinstance(extra, str):
        raise Invalid("wrong_type", f"field '{columns['input']}' is {type(extra).__name__}, expected text")
    if extra and extra.strip():
        text = f"{text}\n{extra}"
    turns = history_field(values.get(columns["history"]), columns["history"]) if "history" in columns else []
    return turns + [{"role": "user", "content": text}]


def with_system(prompt: list[dict], values: dict, columns: dict[str, str], cfg: DataConfig) -> list[dict]:
    """The prompt with its system message first: the row's own (a system column), else data.system_prompt; a
    prompt that starts with a system turn keeps it."""
    system = values.get(columns["system"]) if "system" in columns else None
    if system is not None and not isinstance(system, str):
        raise Invalid("wrong_type", f"field '{columns['system']}' is {type(system).__name__}, expected text")
    return with_system_prompt(prompt, system if system and system.strip() else cfg.system_prompt)


def history_field(value: Any, column: str) -> list[dict]:
    """Alpaca history: [[user, assistant], ...] as messages (None or [] for none)."""
    if not value:
        return []
    if not isinstance(value, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 and
                                              all(isinstance(t, str) and t.strip() for t in p) for p in value):
        raise Invalid("wrong_type", f"field '{column}' must be a list of [user, assistant] text pairs, found {value!r}")
    return [{"role": role, "content": text} for pair in value for role, text in zip(("user", "assistant"), pair)]


def answer_messages(value: Any, column: str, keys: Columns) -> list[dict]:
    """An answer given as text, as one assistant message, or as assistant messages."""
    if isinstance(value, (list, dict)):
        answer = messages_field(value, column, keys)
        other = next((m["role"] for m in answer if m["role"] != "assistant"), None)
        if other:
            raise Invalid("bad_messages", f"field '{column}' holds a {other} turn where an answer (assistant turns "
                          "only) belongs")
        return answer
    return [{"role": "assistant", "content": text_field({column: value}, column)}]


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


def score_field(value: Any, column: str) -> float:
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


def split_shared_text(chosen: str, rejected: str, chosen_col: str, rejected_col: str) -> tuple[str, str, str]:
    """Plain-text chosen and rejected answers that both repeat their prompt (TRL's standard preference type with
    an implicit prompt) as (prompt, chosen answer, rejected answer): the prompt is their common start, as TRL's
    `extract_prompt` takes it, moved back to the last whitespace so that no word is split between the prompt and
    the answers (TRL moves back one space)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and not chosen[shared - 1].isspace():
        shared -= 1
    prompt = chosen[:shared].strip()
    if not prompt:
        raise Invalid("no_shared_prompt", f"'{chosen_col}' and '{rejected_col}' are texts with no prompt in common "
                      "(their first words differ); set data.columns.prompt=<column> if the prompt is in a column of "
                      "its own")
    return prompt, chosen[shared:].strip(), rejected[shared:].strip()


def is_transcript(text: str, keys: Columns) -> bool:
    """Whether a text is an Anthropic-HH transcript: it opens a user turn with the marker after a blank line."""
    return f"\n\n{keys.transcript_user}" in "\n\n" + text.lstrip("\n")


CHOICE_VALUES = {  # choice_kind -> value as written -> which of the two answers is better (0: the first)
    "index": {"0": 0, "1": 1, "a": 0, "b": 1},
    "first_better": {"1": 0, "true": 0, "a": 0, "0": 1, "false": 1, "b": 1},
}


def chosen_index(value: Any, column: str, kind: str) -> int:
    """Which of two answers a choice column picks (0: the first). `kind` says what its values mean: 'index' (0 or
    A picks the first answer, 1 or B the second: PKU-SafeRLHF's better_response_id) or 'first_better' (1, true or A
    means the first answer is the better one: Stanford SHP's labels)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Invalid("missing_choice", f"field '{column}' is missing")
    if isinstance(value, bool):
        written = str(value).lower()
    elif isinstance(value, float) and value.is_integer():
        written = str(int(value))
    else:
        written = str(value).strip().lower()
    picked = CHOICE_VALUES[kind].get(written)
    if picked is None or (isinstance(value, bool) and kind == "index"):
        allowed = ", ".join(sorted({k for k in CHOICE_VALUES[kind] if k not in ("a", "b")})) + ", A or B"
        raise Invalid("bad_choice", f"field '{column}' is {value!r}; with data.columns.choice_kind={kind} it must be "
                      f"one of {allowed}")
    return picked
