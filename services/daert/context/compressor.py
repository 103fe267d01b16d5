"""Compress: fit a conversation into a token budget.

1. Count it exactly (the model's tokenizer and chat template). If it fits, it is returned
   unchanged.
2. System messages are pinned. The other messages form units (an assistant turn with the
   tool results that answer it), and the most recent units are kept verbatim as far as they
   fit, at most `keep_last` messages, leaving room for a summary. The newest unit is always
   kept (keep_last > 0): if it alone is over the budget it is cut, and the response says so.
3. The older units are condensed: folded into a summary (ABSTRACTIVE, EXTRACTIVE) chunk by
   chunk, starting from the conversation's stored rolling summary when it still matches the
   history, or dropped (TRUNCATE). AUTO tries ABSTRACTIVE, then EXTRACTIVE, then TRUNCATE.
4. The result (pinned, the summary as one system message, the kept turns) is counted
   exactly again and tightened until it fits: the summary is cut first, then the oldest kept
   units go, then the newest is cut.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from daert.context.messages import Message, fingerprint, units
from daert.context.rolling import RollingSummaries, StoredSummary
from daert.context.summarizers import Condensing, Summarizer, Summary
from daert.context.tokenizers import TemplatedTokenizer
from daert.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable
from daert.v1 import context_pb2

log = logging.getLogger("daert.context")

AUTO = context_pb2.COMPRESSION_STRATEGY_AUTO
ABSTRACTIVE = context_pb2.COMPRESSION_STRATEGY_ABSTRACTIVE
EXTRACTIVE = context_pb2.COMPRESSION_STRATEGY_EXTRACTIVE
TRUNCATE = context_pb2.COMPRESSION_STRATEGY_TRUNCATE
NOTHING = context_pb2.COMPRESSION_STRATEGY_UNSPECIFIED

# A summary shorter than this is not worth a system message (or an LLM call).
MIN_SUMMARY_TOKENS = 16
# Share of the budget (after the pinned messages) held back for the summary when the request
# does not set summary_max_tokens.
SUMMARY_SHARE = 0.25
# Tightening rounds before everything but the pinned messages is given up.
MAX_FIT_ROUNDS = 12


@dataclass(frozen=True)
class CompressJob:
    messages: list[Message]
    budget: int
    keep_last: int
    strategy: context_pb2.CompressionStrategy.ValueType
    tokenizer: TemplatedTokenizer
    tenant: str
    conversation_id: str  # empty: stateless
    summary_model: str
    summary_max_tokens: int  # 0: what is left of the budget


@dataclass
class Compressed:
    messages: list[Message]
    tokens_before: int
    tokens_after: int
    strategy_used: context_pb2.CompressionStrategy.ValueType = NOTHING
    summary: str = ""
    messages_compressed: int = 0
    summary_reused: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: list[int] = field(default_factory=list)  # indexes in `messages`
    fallback_reason: str = ""


@dataclass
class _Written:
    text: str
    reused: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0


def chunks(turns: Sequence[Message], costs: Sequence[int], limit: int) -> list[list[Message]]:
    """Consecutive runs of turns of at most `limit` tokens each (a longer turn alone)."""
    runs: list[list[Message]] = []
    spent = limit
    for turn, cost in zip(turns, costs, strict=True):
        if spent + cost > limit:
            runs.append([])
            spent = 0
        runs[-1].append(turn)
        spent += cost
    return runs


class Compressor:
    def __init__(
        self,
        summarizers: dict[int, Summarizer],
        rolling: RollingSummaries,
        chunk_tokens: int,
    ) -> None:
        self._summarizers = summarizers
        self._rolling = rolling
        self._chunk_tokens = chunk_tokens

    async def compress(self, job: CompressJob) -> Compressed:
        tokenizer = job.tokenizer
        counted = await tokenizer.count(job.messages)
        if counted.total <= job.budget:
            return Compressed(job.messages, counted.total, counted.total)

        pinned = [m for m in job.messages if m.role == "system"]
        rest_at = [i for i, m in enumerate(job.messages) if m.role != "system"]
        rest = [job.messages[i] for i in rest_at]
        costs = [counted.per_message[i] for i in rest_at]
        base = (await tokenizer.count(pinned)).total if pinned else counted.overhead
        if base > job.budget:
            raise InvalidArgument(
                "token_budget",
                f"the system messages alone take {base} tokens; the budget is {job.budget}",
            )
        available = job.budget - base

        groups = units(rest)
        reserve = (
            0
            if job.strategy == TRUNCATE
            else job.summary_max_tokens or int(available * SUMMARY_SHARE)
        )
        kept_groups: list[list[int]] = []
        spent = kept_count = 0
        for group in reversed(groups):
            cost = sum(costs[i] for i in group)
            if job.keep_last == 0 or (kept_groups and kept_count + len(group) > job.keep_last):
                break
            if kept_groups and spent + cost > available - reserve:
                break
            kept_groups.insert(0, group)
            spent += cost
            kept_count += len(group)
        first_kept = kept_groups[0][0] if kept_groups else len(rest)
        condensed = rest[:first_kept]

        result = Compressed(job.messages, counted.total, 0, messages_compressed=len(condensed))
        summary = ""
        if condensed and job.strategy != TRUNCATE:
            room = job.summary_max_tokens or available - spent
            summary = await self._summary(job, condensed, costs[:first_kept], room, result)
        elif condensed or spent > available:
            result.strategy_used = TRUNCATE

        kept = [[rest[i] for i in group] for group in kept_groups]
        await self._fit(job, pinned, summary, kept, result)
        return result

    async def _summary(
        self,
        job: CompressJob,
        condensed: list[Message],
        costs: list[int],
        room: int,
        result: Compressed,
    ) -> str:
        """The summary of the condensed turns by the first strategy that can write one;
        sets what `result` reports about it. Empty when none can (AUTO: TRUNCATE)."""
        if room < MIN_SUMMARY_TOKENS:
            result.strategy_used = TRUNCATE
            result.fallback_reason = f"no room for a summary ({room} tokens left)"
            return ""
        order = [ABSTRACTIVE, EXTRACTIVE] if job.strategy == AUTO else [job.strategy]
        failures = []
        for strategy in order:
            try:
                written = await self._write(strategy, job, condensed, costs, room)
            except (Unavailable, ResourceExhausted) as exc:
                if job.strategy != AUTO:
                    raise
                failures.append(f"{context_pb2.CompressionStrategy.Name(strategy)}: {exc.message}")
                continue
            result.strategy_used = strategy
            result.summary_reused = written.reused
            result.prompt_tokens = written.prompt_tokens
            result.completion_tokens = written.completion_tokens
            result.fallback_reason = "; ".join(failures)
            return written.text
        result.strategy_used = TRUNCATE
        result.fallback_reason = "; ".join(failures)
        log.warning("no summary could be written; older turns dropped", extra={"why": failures})
        return ""

    async def _write(
        self,
        strategy: int,
        job: CompressJob,
        condensed: list[Message],
        costs: list[int],
        room: int,
    ) -> _Written:
        """Fold the turns not yet in the stored summary into it (all of them when there is
        none, or when the history it covers was edited) and store the result."""
        stored = (
            await self._rolling.get(job.tenant, job.conversation_id)
            if job.conversation_id
            else None
        )
        start, written = 0, _Written("", reused=False)
        if (
            stored is not None
            and stored.strategy == strategy
            and stored.covered <= len(condensed)
            and fingerprint(condensed[: stored.covered]) == stored.fingerprint
        ):
            start, written = stored.covered, _Written(stored.text, reused=True)
        summarizer = self._summarizers[strategy]
        condensing = Condensing(job.tokenizer, job.tenant, job.summary_model)
        for run in chunks(condensed[start:], costs[start:], self._chunk_tokens):
            folded: Summary = await summarizer.fold(written.text, run, room, condensing)
            written.text = folded.text
            written.prompt_tokens += folded.prompt_tokens
            written.completion_tokens += folded.completion_tokens
        if job.conversation_id:
            await self._rolling.put(
                job.conversation_id,
                StoredSummary(
                    job.tenant, len(condensed), fingerprint(condensed), written.text, strategy
                ),
            )
        return written

    async def _fit(
        self,
        job: CompressJob,
        pinned: list[Message],
        summary: str,
        kept: list[list[Message]],
        result: Compressed,
    ) -> None:
        """Assemble the answer and tighten it until its exact count is within the budget."""
        tokenizer = job.tokenizer
        cut: set[int] = set()  # indexes in the flattened kept messages
        for _ in range(MAX_FIT_ROUNDS):
            flat = [m for group in kept for m in group]
            head = [*pinned, *([Message("system", summary)] if summary else [])]
            candidate = [*head, *flat]
            total = (await tokenizer.count(candidate)).total
            excess = total - job.budget
            if excess <= 0:
                result.messages, result.tokens_after, result.summary = candidate, total, summary
                result.truncated = sorted(len(head) + i for i in cut)
                return
            if summary:
                summary = await tokenizer.truncate(
                    summary, await tokenizer.count_text(summary) - excess - 1
                )
                if await tokenizer.count_text(summary) < MIN_SUMMARY_TOKENS:
                    summary = ""
            elif len(kept) > 1:
                dropped = kept.pop(0)
                result.messages_compressed += len(dropped)
                cut = {i - len(dropped) for i in cut}
                result.strategy_used = result.strategy_used or TRUNCATE
            elif flat:
                # The newest unit alone is over the budget: cut its longest message.
                group = kept[0]
                longest = max(range(len(group)), key=lambda i: len(group[i].content))
                message = group[longest]
                keep_tokens = await tokenizer.count_text(message.content) - excess - 1
                if keep_tokens <= 0:
                    del group[longest]
                    result.messages_compressed += 1
                    cut = {i - 1 if i > longest else i for i in cut if i != longest}
                    if not group:
                        kept.clear()
                else:
                    text = await tokenizer.truncate(message.content, keep_tokens)
                    group[longest] = Message(message.role, text, message.name)
                    cut.add(longest)
                result.strategy_used = result.strategy_used or TRUNCATE
            else:
                break
        raise InvalidArgument(
            "token_budget", f"{job.budget} tokens is too small for this conversation's model"
        )
