"""The gateway's RAG step without servers: the grounded prompt, the options' checks, the
budget arithmetic, and the annotations found from an answer's [n] markers."""

from __future__ import annotations

from typing import Any

import pytest
from daert.gateway import rag
from daert.gateway.prompts import INSTRUCTIONS, NOTHING_FOUND, grounded_prompt, passage_block
from daert.gateway.rag import (
    Citation,
    RagOptionError,
    RagOptions,
    citations_payload,
    current_turn,
    estimate_tokens,
    passages_that_fit,
    snippet,
    trim_by_estimate,
)
from daert.v1 import common_pb2

CITATIONS = [
    Citation(1, "manual-0", "manual", "file:///docs/manual.md", 0.9, "Pumps...", "Manual"),
    Citation(2, "faq-3", "faq", "https://example.com/faq", 0.7, "Hours...", ""),
    Citation(3, "notes-1", "", "", 0.2, "Notes..."),
]


def user(content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=content)


def assistant(content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content=content)


def system(content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=content)


# --------------------------------------------------------------------------- prompt


def test_the_grounded_prompt_numbers_the_passages_in_rank_order() -> None:
    blocks = [passage_block(1, "  Pumps are checked.\n", "Manual"), passage_block(2, "Open 9-5.")]
    prompt = grounded_prompt(blocks)
    assert prompt.startswith(INSTRUCTIONS)
    assert "[1] Manual\nPumps are checked." in prompt
    assert "[2]\nOpen 9-5." in prompt
    assert prompt.index("[1] Manual") < prompt.index("[2]\n")
    assert NOTHING_FOUND not in prompt
    for rule in ("only the numbered passages", "[1]", "could not find it", "not instructions"):
        assert rule in INSTRUCTIONS


def test_with_no_passages_the_prompt_says_nothing_was_found() -> None:
    prompt = grounded_prompt([])
    assert prompt == f"{INSTRUCTIONS}\n\n{NOTHING_FOUND}"
    assert "Passages:" not in prompt


def test_a_snippet_is_one_line_cut_at_a_word() -> None:
    assert snippet("a  short\n text") == "a short text"
    long = "word " * 100
    cut = snippet(long, limit=22)
    assert cut == "word word word word…"
    assert len(cut) <= 23


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"collection": ""}, "rag.collection"),
        ({"top_k": 0}, "rag.top_k"),
        ({"top_k": 1001}, "rag.top_k"),
        ({"top_k": True}, "rag.top_k"),
        ({"top_k": 5, "top_n": 6}, "rag.top_n"),
        ({"top_n": 0}, "rag.top_n"),
        ({"top_n": 2.5}, "rag.top_n"),
        ({"mode": "semantic"}, "rag.mode"),
        ({"filter": ["region"]}, "rag.filter"),
        ({"filter": {"region": object()}}, "rag.filter"),
    ],
)
def test_a_bad_option_names_its_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(RagOptionError) as caught:
        RagOptions(**{"collection": "docs", **fields})
    assert caught.value.field == param
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(f"{param}: ")


def test_good_options_pass() -> None:
    options = RagOptions("docs", top_k=50, top_n=50, filter={"year": {"gte": 2020}}, mode="vector")
    assert (options.top_k, options.top_n, options.mode) == (50, 50, "vector")


def test_the_query_is_the_last_user_message() -> None:
    messages = [system("Be brief."), user("first"), assistant("ok"), user("second"), assistant("")]
    assert current_turn(messages) == 3
    with pytest.raises(RagOptionError) as caught:
        current_turn([system("Be brief."), assistant("hello")])
    assert caught.value.field == "messages"
    with pytest.raises(RagOptionError) as caught:
        current_turn([user("question"), user("   ")])
    assert caught.value.field == "messages"


# --------------------------------------------------------------------------- budget


def test_passages_fill_the_room_best_first_and_stop_at_the_first_that_does_not_fit() -> None:
    assert passages_that_fit(100, [50, 50, 50], must=40, budget=1000) == 3
    # 60 tokens of room: the first fits, the second (50) does not, and the third (10) is
    # not taken ahead of it: the passages kept are always the top ranks.
    assert passages_that_fit(100, [50, 50, 10], must=40, budget=200) == 1
    assert passages_that_fit(100, [50], must=100, budget=200) == 0


def test_a_budget_too_small_for_the_prompt_or_the_last_turn_is_an_error() -> None:
    with pytest.raises(RagOptionError) as caught:
        passages_that_fit(300, [10], must=0, budget=200)
    assert caught.value.field == "token_budget"
    with pytest.raises(RagOptionError) as caught:
        passages_that_fit(100, [10], must=101, budget=200)
    assert caught.value.field == "messages"


def test_the_estimate_drops_the_oldest_turns_first_and_keeps_the_pinned() -> None:
    messages = [system("rules"), user("u0"), assistant("a0"), user("u1"), assistant("a1")]
    costs = [5, 10, 10, 10, 10]
    pinned = {0, 3, 4}  # the system message and the current turn
    assert trim_by_estimate(messages, costs, pinned, room=100) == messages
    assert trim_by_estimate(messages, costs, pinned, room=15) == [
        messages[0],
        messages[2],
        messages[3],
        messages[4],
    ]
    # a0 does not fit, so u0 (older, small enough) is not kept after the gap.
    assert trim_by_estimate(messages, [5, 1, 10, 10, 10], pinned, room=5) == [
        messages[0],
        messages[3],
        messages[4],
    ]


def test_the_estimate_over_counts_english() -> None:
    text = "The coolant pump of the Helix-9 reactor is inspected every 400 operating hours."
    # About four characters a token in English: the estimate must be above that.
    assert estimate_tokens(user(text)) > len(text) / 4


# --------------------------------------------------------------------------- annotations


def spans(text: str) -> list[tuple[str, str]]:
    found = rag.annotations(text, CITATIONS)
    for entry in found:
        assert entry["type"] == "url_citation"
        assert set(entry["url_citation"]) == {"start_index", "end_index", "url", "title"}
    return [
        (
            text[e["url_citation"]["start_index"] : e["url_citation"]["end_index"]],
            e["url_citation"]["url"],
        )
        for e in found
    ]


def test_a_marker_points_at_its_passage() -> None:
    text = "Pumps are inspected every 400 hours [1]."
    [entry] = rag.annotations(text, CITATIONS)
    assert entry == {
        "type": "url_citation",
        "url_citation": {
            "start_index": 36,
            "end_index": 39,
            "url": "file:///docs/manual.md",
            "title": "Manual",
        },
    }
    assert text[36:39] == "[1]"


def test_adjacent_and_listed_markers_cite_each_passage() -> None:
    assert spans("Open at nine [2][3].") == [("[2]", "https://example.com/faq"), ("[3]", "")]
    assert spans("Both say so [1, 2].") == [
        ("[1, 2]", "file:///docs/manual.md"),
        ("[1, 2]", "https://example.com/faq"),
    ]


def test_markers_that_name_no_passage_are_ignored() -> None:
    assert spans("See [0], [4], [12] and [99999999999999999999].") == []
    assert spans("Mixed [4][1] and [2, 7].") == [
        ("[1]", "file:///docs/manual.md"),
        ("[2, 7]", "https://example.com/faq"),
    ]
    assert spans("No markers: [a], [], [-1], (1), [ 1 ].") == []
    assert rag.annotations("An answer [1].", []) == []


def test_indexes_count_characters_not_bytes() -> None:
    text = "Größe: 400 Stunden ✓ [2]"
    [entry] = rag.annotations(text, CITATIONS)
    start, end = entry["url_citation"]["start_index"], entry["url_citation"]["end_index"]
    assert text[start:end] == "[2]"


def test_the_title_falls_back_to_the_document_then_the_chunk() -> None:
    titles = [e["url_citation"]["title"] for e in rag.annotations("[1][2][3]", CITATIONS)]
    assert titles == ["Manual", "faq", "notes-1"]


def test_the_citations_payload_lists_every_passage() -> None:
    [first, *_] = payload = citations_payload(CITATIONS)
    assert len(payload) == 3
    assert first == {
        "index": 1,
        "chunk_id": "manual-0",
        "document_id": "manual",
        "source_uri": "file:///docs/manual.md",
        "score": 0.9,
        "snippet": "Pumps...",
        "title": "Manual",
    }
