"""The context service: fits conversations into a token budget for the model that reads
them (exact counts, pinned system prompt, recent turns verbatim, rolling summaries)."""
