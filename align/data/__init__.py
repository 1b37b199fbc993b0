"""The user's data: read any supported file (`files`), map its columns (`columns`, from the names in `names`),
turn each row into TRL's conversational form (`fields`, and one module per kind: `qa`, `preference`, `feedback`,
`prompts`, described in `kinds`), validate every row and count what is skipped (`checks`).

Rows are located as `file:line` (jsonl, csv) or `file row N` (the others), and every problem is reported at that
location with the field and the fix. With `data.skip_invalid=true` bad rows are skipped, counted by reason and
logged; nothing is dropped silently. The package imports nothing of its own here, so that `align.recipe` can read
`names` and `files` for its help."""
