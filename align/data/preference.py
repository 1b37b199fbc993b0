"""Preference data (the reward and DPO stages), in four shapes (docs/data.md), all turned into one pair format,
{prompt, chosen, rejected} as messages:
- an explicit prompt + chosen + rejected (text or messages);
- chosen and rejected that repeat their prompt: conversations (or Anthropic-HH transcripts) whose common first
  turns are the prompt, or plain texts whose common start is (TRL's implicit-prompt types);
- two answers and a choice (data.columns.responses=[a, b], data.columns.choice, data.columns.choice_kind);
- rated responses (several per prompt, each with a score), paired by `data.pair_rule`.
Scores of the chosen and rejected answers can be mapped to a margin the reward model's loss keeps between them
(data.columns.score_chosen and score_rejected; TRL's `margin` column)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from align.data.checks import account, attempt, available, open_records, prompt_lengths, row_values, validated
from align.data.columns import looks_like, resolve_columns
from align.data.fields import (answer_messages, chosen_index, is_transcript, message_field, messages_field,
                               prompt_messages, score_field, split_shared_text, transcript, with_system)
from align.data.files import DataError, Invalid, Record
from align.data.names import PROMPT_PARTS
from align.modeling import conversation_ids

if TYPE_CHECKING:
    from align.recipe import Columns, DataConfig, PairRule

log = logging.getLogger("align.data")


def columns(path: str, names: list[str], mapping: Columns) -> tuple[dict[str, Any], list[str]]:
    """Chosen + rejected (+ prompt, optional when they repeat it), two responses + a choice (+ prompt), or
    prompt + responses + scores (rated data); returns (columns, fields that were auto-detected)."""
    two_answers = isinstance(mapping.responses, (list, tuple))
    if two_answers and (len(mapping.responses) != 2 or mapping.choice is None):
        raise DataError(f"{path}: data.columns.responses={list(mapping.responses)} names "
                        f"{len(mapping.responses)} columns; two answers and a choice need two, and "
                        "data.columns.choice=<column> saying which is better (docs/data.md)")
    if mapping.choice is not None and not two_answers:
        raise DataError(f"{path}: data.columns.choice is set, so data.columns.responses must name the two answer "
                        "columns it chooses between: data.columns.responses=[first,second]")
    found = resolve_columns(path, names, mapping, ("prompt", "chosen", "rejected", "responses", "scores", "choice",
                                                   "messages"))
    if "prompt" not in found and "messages" in found:  # ShareGPT preferences: the conversation so far is the prompt
        found["prompt"] = found["messages"]
    if two_answers:
        if "prompt" not in found:
            raise DataError(f"{path}: cannot tell which column holds the prompt the two answers reply to (columns: "
                            f"{', '.join(names)}); set data.columns.prompt=<column>")
        resolved = {name: found[name] for name in ("prompt", "responses", "choice")}
    elif {"chosen", "rejected"} <= found.keys():
        resolved = {name: found[name] for name in ("prompt", "chosen", "rejected") if name in found}
        if (mapping.score_chosen is None) != (mapping.score_rejected is None):
            raise DataError(f"{path}: a margin needs both data.columns.score_chosen and data.columns.score_rejected")
        resolved |= resolve_columns(path, names, mapping, ("score_chosen", "score_rejected"))
    elif {"prompt", "responses", "scores"} <= found.keys():
        resolved = {name: found[name] for name in ("prompt", "responses", "scores")}
    else:
        raise DataError(
            f"{path}: cannot tell which columns hold the preferences (columns: {', '.join(names)}); pairs need "
            "data.columns.chosen and data.columns.rejected (and data.columns.prompt unless they repeat the prompt), "
            "two answers and a choice need data.columns.responses=[first,second] and data.columns.choice, rated "
            "data needs data.columns.prompt, data.columns.responses and data.columns.scores"
            + looks_like(names, "preference"))
    resolved |= resolve_columns(path, names, mapping, PROMPT_PARTS if "prompt" in resolved else ("system",),
                                resolved)
    return resolved, [name for name in resolved
                      if getattr(mapping, name) is None and not (name == "prompt" and mapping.messages is not None)]


def example(values: dict, columns: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """One chosen/rejected (or two answers and a choice) row as {prompt, chosen, rejected} messages, with its
    margin when scores are mapped. Without a prompt column, chosen and rejected must repeat the prompt:
    conversations (or Anthropic-HH transcripts) whose shared first turns are the prompt, or plain texts whose
    shared start is; so are they read when they are whole conversations next to a prompt column (as in
    UltraFeedback-style data, which has both)."""
    keys = cfg.columns
    if "choice" in columns:
        first, second = columns["responses"]
        answers = [answer_messages(values.get(c), c, keys) for c in (first, second)]
        better = chosen_index(values.get(columns["choice"]), columns["choice"], keys.choice_kind.value)
        prompt, chosen, rejected = prompt_messages(values, columns, keys), answers[better], answers[1 - better]
        chosen_col, rejected_col = (first, second)[better], (first, second)[1 - better]
    else:
        chosen_col, rejected_col = columns["chosen"], columns["rejected"]
        prompt, chosen, rejected = _pair(values, columns, keys, chosen_col, rejected_col)
    if chosen == rejected:
        raise Invalid("identical", f"fields '{chosen_col}' and '{rejected_col}' hold the same answer")
    pair = {"prompt": with_system(prompt, values, columns, cfg), "chosen": chosen, "rejected": rejected}
    if "score_chosen" in columns:
        pair["margin"] = (score_field(values.get(columns["score_chosen"]), columns["score_chosen"])
                          - score_field(values.get(columns["score_rejected"]), columns["score_rejected"]))
    return pair


def _pair(values: dict, columns: dict[str, str], keys: Columns, chosen_col: str, rejected_col: str):
    """(prompt, chosen, rejected) messages of a chosen/rejected row."""
    chosen_value, rejected_value = values.get(chosen_col), values.get(rejected_col)
    if "prompt" in columns and not is_conversation(chosen_value, keys):
        return (prompt_messages(values, columns, keys), answer_messages(chosen_value, chosen_col, keys),
                answer_messages(rejected_value, rejected_col, keys))
    if isinstance(chosen_value, str) and isinstance(rejected_value, str) and not is_transcript(chosen_value, keys):
        prompt, chosen, rejected = split_shared_text(chosen_value, rejected_value, chosen_col, rejected_col)
        return ([{"role": "user", "content": prompt}], answer_messages(chosen or None, chosen_col, keys),
                answer_messages(rejected or None, rejected_col, keys))
    whole_chosen, whole_rejected = (
        messages_field(v, c, keys) if isinstance(v, (list, dict)) else transcript(v, c, keys)
        for v, c in ((chosen_value, chosen_col), (rejected_value, rejected_col)))
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
    return prompt, answer_messages(chosen or None, chosen_col, keys), answer_messages(rejected or None, rejected_col, keys)


def is_conversation(value: Any, keys: Columns) -> bool:
    """Whether an answer column holds a whole conversation (it starts with a user or system turn)."""
    if not isinstance(value, list) or not value:
        return False
    try:
        return message_field(value[0], 1, "", keys)["role"] != "assistant"
    except Invalid:
        return False


@dataclass
class Rated:
    """The responses to one prompt, each with its score and where it was read."""

    prompt: list[dict]
    responses: list[tuple[list[dict], float, int, str]] = field(default_factory=list)  # (answer, score, row, where)


def rated_prompts(records: list[Record], columns: dict[str, str], cfg: DataConfig):
    """Rated rows grouped by prompt, and the rows that could not be read: a row holds either lists of responses
    and scores, or one response and its score (rows with the same prompt are then one group)."""
    groups: dict[str, Rated] = {}
    problems = []
    for row, record in enumerate(records):
        try:
            values = row_values(record)
            prompt = with_system(prompt_messages(values, columns, cfg.columns), values, columns, cfg)
            responses, scores = values.get(columns["responses"]), values.get(columns["scores"])
            if isinstance(responses, list) and responses and not isinstance(responses[0], dict):
                if not isinstance(scores, list) or len(scores) != len(responses):
                    raise Invalid("wrong_type", f"field '{columns['scores']}' must be a list with one score per "
                                  f"response ({len(responses)}), found {scores!r}")
                items = [(answer_messages(r, columns["responses"], cfg.columns), score_field(x, columns["scores"]))
                         for r, x in zip(responses, scores)]
            else:
                items = [(answer_messages(responses, columns["responses"], cfg.columns), score_field(scores, columns["scores"]))]
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
    if rule.value == "best_vs_worst" and worse:
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
    prompt_len = prompt_lengths(tokenizer, examples)
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


def load(path: str, cfg: DataConfig, tokenizer, max_length: int):
    """Preference pairs from `path` as a `datasets.Dataset` of {prompt, chosen, rejected} messages (and margin,
    when mapped) plus their token ids (chosen_ids, rejected_ids; TRL's RewardTrainer trains on these as they are),
    and its DataReport. Errors and skips as in `qa.load`; a pair whose longer side exceeds `max_length` tokens is
    'too_long'."""
    from datasets import Dataset

    records, report = open_records(path)
    report.columns, report.detected = columns(str(path), available(records), cfg.columns)
    account(records, report, "reward model", cfg.columns.ignore)
    if "scores" in report.columns:
        groups, items = rated_prompts(records, report.columns, cfg)
        pairing = Counter()
        for group in groups:
            items.extend(rated_pairs(group, cfg.pair_rule, pairing))
        report.pairing = {"rule": cfg.pair_rule.value, "prompts": len(groups), **pairing}
        log.info("%s: %d prompts with rated responses -> pairs by %s; dropped: %d responses tied with the best, "
                 "%d prompts with a single response", path, len(groups), cfg.pair_rule.value,
                 pairing["tied_with_best"], pairing["single_response"])
    else:
        items = [(row, record.where, attempt(example, record, report.columns, cfg))
                 for row, record in enumerate(records)]
    token_ids: dict[str, list] = {}

    def lengths(examples):
        measured = pair_token_ids(tokenizer, examples)
        token_ids.update({k: measured[k] for k in ("chosen_ids", "rejected_ids")})
        return {k: measured[k] for k in ("prompt", "chosen", "rejected", "total")}

    examples = validated(items, lengths, max_length, cfg, report, columns=token_ids)
    _describe(report, records, examples, cfg)
    return Dataset.from_list(examples), report


def _describe(report, records: list[Record], examples: list[dict], cfg: DataConfig) -> None:
    """What the report says of the pairs beyond counts: prompts taken from the answers' shared start, and the
    first pair a choice column formed (so that its direction can be checked by eye)."""
    columns = report.columns
    if "prompt" not in columns and "chosen" in columns:
        texts = [r.values for r in records if isinstance(r.values, dict)
                 and isinstance(r.values.get(columns["chosen"]), str)
                 and not is_transcript(r.values[columns["chosen"]], cfg.columns)]
        if texts:
            sizes = sorted(len(e["prompt"][-1]["content"]) for e in examples)
            report.note(f"the prompt of {len(texts)} rows was taken from the start chosen and rejected share (TRL's "
                        f"implicit prompt), {sizes[len(sizes) // 2]} characters at the median, {sizes[0]}-{sizes[-1]}")
    if "choice" in columns and examples:
        first = examples[0]
        report.note(f"{columns['choice']} with choice_kind={cfg.columns.choice_kind.value} gives, for the first "
                    f"pair: prompt {_shown(first['prompt'])}, chosen {_shown(first['chosen'])}, rejected "
                    f"{_shown(first['rejected'])}")
    if "score_chosen" in columns:
        margins = sorted(e["margin"] for e in examples)
        report.note(f"margin = {columns['score_chosen']} - {columns['score_rejected']} (the reward model keeps "
                    f"chosen that far above rejected), {margins[0]:g} to {margins[-1]:g}")


def _shown(messages: list[dict], limit: int = 60) -> str:
    text = messages[-1]["content"]
    return repr(text if len(text) <= limit else text[:limit] + "...")
