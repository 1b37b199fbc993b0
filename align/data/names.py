"""The names align knows data by, declared once and importing nothing of align: the column names each field is
auto-detected from, the shapes a hint recognises, and how messages spell their roles. The recipe's column help
(`recipe.Columns`), the column resolution and `align data check` derive from these."""

# field -> the column names it is auto-detected from, in order of preference
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

# Two answers and a choice (PKU-SafeRLHF, Stanford SHP): columns whose names suggest the shape, for the hint that
# says how to map them (the mapping itself is always explicit: the same 0/1 means opposite things in such files).
ANSWER_PAIRS = (("response_0", "response_1"), ("response_a", "response_b"), ("answer_0", "answer_1"),
                ("human_ref_A", "human_ref_B"), ("completion_a", "completion_b"), ("output_1", "output_2"))
CHOICE_COLUMNS = {"better_response_id": "index", "safer_response_id": "index", "labels": "first_better",
                  "choice": "index", "preference": "index", "winner": "index"}

ROLES = ("system", "user", "assistant")
ROLE_KEYS, CONTENT_KEYS = ("role", "from"), ("content", "value", "text")
ROLE_TAGS = {"user": ("user", "human"), "assistant": ("assistant", "gpt", "bot", "model", "chatgpt"),
             "system": ("system",)}

# What an unused column with one of these names probably holds, and the key that would use it.
CONTENT_HINTS = {"input": "data.columns.input", "context": "data.columns.input", "system": "data.columns.system",
                 "history": "data.columns.history", "instruction": "data.columns.prompt",
                 "question": "data.columns.prompt", "prompt": "data.columns.prompt", "query": "data.columns.prompt",
                 "response": "data.columns.completion", "output": "data.columns.completion",
                 "answer": "data.columns.completion", "conversations": "data.columns.messages",
                 "messages": "data.columns.messages"}


def auto_detected(field: str) -> str:
    """The end of a column key's help: where an unset one is looked for."""
    return f"None: auto-detect ({', '.join(AUTO_COLUMNS[field])})."
