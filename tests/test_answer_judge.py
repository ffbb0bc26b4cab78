"""Answering, judging and the local metrics (EM / token F1).

The LLM side runs the real ``openai`` client against the scripted server on 127.0.0.1, with the
deterministic :class:`MemoryResponder` standing in for the model.
"""

from __future__ import annotations

import asyncio

import pytest
from membuilder._core import MemoryState
from membuilder.agents import RawTurnBuilder
from membuilder.answer import Answerer, build_answer_messages
from membuilder.judge import Judge, build_judge_messages, parse_judge_label
from membuilder.llm import LLMClient, LLMConfig
from membuilder.metrics import exact_match, normalize_answer, token_f1
from membuilder.testing import ScriptedOpenAIServer
from membuilder.testing.responders import MemoryResponder, sample_conversation

# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  a   b\tc ", "b c"),
        ("An apple, the pear.", "apple pear"),
        ("Theatre", "theatre"),  # "the" only as a whole word
        (2022, "2022"),
        (None, ""),
        ("“Quoted” — dash", "quoted dash"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_is_normalised():
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match("a cat", "cats") == 0.0
    assert exact_match("", "") == 1.0


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("red bike", "red bike", 1.0),
        ("a red bicycle", "red bike", 0.5),  # p = r = 1/2
        ("red red bike", "red bike", 0.8),  # p = 2/3, r = 1 -> 0.8
        ("blue car", "red bike", 0.0),
        ("", "red bike", 0.0),
        ("", "", 1.0),  # both empty: SQuAD 2.0 convention
        ("7 May 2023", "May 7, 2023", 1.0),  # same multiset of tokens
        ("Max the beagle", "Max", 2 * (1 / 2) * 1 / (1 / 2 + 1)),  # "the" dropped: p = 1/2, r = 1
    ],
)
def test_token_f1(pred, gold, expected):
    assert token_f1(pred, gold) == pytest.approx(expected)


def test_token_f1_is_symmetric_and_bounded():
    pairs = [("a b c d", "b c e"), ("x", "x y z"), ("one two two", "two")]
    for a, b in pairs:
        f = token_f1(a, b)
        assert 0.0 <= f <= 1.0
        assert f == pytest.approx(token_f1(b, a))


# ---------------------------------------------------------------------------------------------
# judge label parsing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"label": "CORRECT"}', True),
        ('{"label": "WRONG"}', False),
        ('{"label": "correct"}', True),
        ('```json\n{"label": "WRONG"}\n```', False),
        ('<think>maybe CORRECT, maybe WRONG</think>{"label": "CORRECT"}', True),
        ('The answer names the same date. {"reasoning": "same day", "label": "CORRECT"}', True),
        ('{"label": "CORRECT",}', True),  # broken JSON, but the label field is clear
        ("label: WRONG", False),
        ("CORRECT", True),
        ("INCORRECT", False),
        ("It could be CORRECT or WRONG.", None),
        ('{"label": "MAYBE"}', None),
        ("", None),
        (None, None),
        ("I cannot tell.", None),
    ],
)
def test_parse_judge_label(reply, expected):
    assert parse_judge_label(reply) is expected


def test_prompts_are_pure_and_carry_the_inputs():
    a = build_answer_messages("Caroline is a counsellor.", ["m1", "m2\nline"], "Who?", "2023-06-01")
    assert a == build_answer_messages("Caroline is a counsellor.", ["m1", "m2\nline"], "Who?", "2023-06-01")
    user = a[1]["content"]
    assert "1. m1" in user and "2. m2 line" in user
    assert "<current_date>2023-06-01</current_date>" in user and "<question>Who?</question>" in user
    assert "Caroline is a counsellor." in user
    j = build_judge_messages("When?", 2022, "in 2022")
    assert "<gold_answer>2022</gold_answer>" in j[1]["content"]
    assert j == build_judge_messages("When?", 2022, "in 2022")


# ---------------------------------------------------------------------------------------------
# against the scripted server
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder():
    # Deterministic bag-of-words vectors: fast on a busy machine, and retrieval by shared words is
    # all these tests need. The bundled e5 model is used where noted (``e5``).
    from membuilder.embed import HashingEmbedder

    return HashingEmbedder(256)


@pytest.fixture(scope="module")
def e5():
    from membuilder.embed import LocalE5Embedder

    return LocalE5Embedder()


@pytest.fixture
def responder():
    return MemoryResponder()


@pytest.fixture
def server(responder):
    with ScriptedOpenAIServer(responder) as srv:
        yield srv


def _client(server, **overrides) -> LLMClient:
    cfg = {
        "model": "scripted-model",
        "base_url": server.base_url,
        "api_key": "sk-test-not-a-key",
        "provider": "compatible",
        "max_retries": 2,
        "timeout": 5.0,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
    }
    cfg.update(overrides)
    return LLMClient(LLMConfig(**cfg))


async def _raw_state(embedder) -> MemoryState:
    state = MemoryState(embedder.dim)
    builder = RawTurnBuilder(embedder)
    for i, (ts, msgs) in enumerate(sample_conversation()):
        await builder.build_session(state, msgs, conversation_id="c", session_index=i, timestamp=ts)
    return state


QUESTIONS = [
    ("What is the name of Melanie's dog?", "Max"),
    ("How long does Caroline steep her cold brew?", "16 hours"),
    ("What did Melanie paint with her kids?", "lake sunrise"),
]


def test_answer_and_judge_end_to_end(server, e5):
    async def run():
        state = await _raw_state(e5)
        async with _client(server) as llm:
            answerer = Answerer(llm, e5, top_k=10)
            judge = Judge(llm)
            out = []
            for q, gold in QUESTIONS:
                ans = await answerer.answer(state, q, "2023-07-01")
                verdict = await judge.judge(q, gold, ans.answer)
                out.append((ans, verdict))
            return state, out

    state, out = asyncio.run(run())
    for (q, gold), (ans, verdict) in zip(QUESTIONS, out):
        # what the answer was based on is reported, consistently with the state
        assert 0 < len(ans.retrieved_ids) <= 10
        assert ans.retrieved_texts == state.texts(ans.retrieved_ids)
        assert set(ans.retrieved_kinds) == {"episodic"}
        assert ans.retrieved_scores == sorted(ans.retrieved_scores, reverse=True)
        assert ans.messages == build_answer_messages(state.core, ans.retrieved_texts, q, "2023-07-01")
        assert verdict.correct is True, (q, ans.answer)
        assert verdict.attempts == 1 and verdict.error is None
    assert server.count("answer") == len(QUESTIONS) and server.count("judge") == len(QUESTIONS)
    # the header routing tag and the JSON mode reached the endpoint
    judged = [r for r in server.requests if r.tag == "judge"]
    assert all(r.body.get("response_format") == {"type": "json_object"} for r in judged)


def test_judge_says_wrong_for_a_wrong_answer_and_for_unavailable(server):
    async def run():
        async with _client(server) as llm:
            judge = Judge(llm)
            return (
                await judge.judge("Dog's name?", "Max", "Buddy"),
                await judge.judge("Dog's name?", "Max", "Not answerable"),
                await judge.judge("Cat's name?", "Not answerable", "Not answerable"),
            )

    wrong, unavailable, abstain = asyncio.run(run())
    assert wrong.correct is False and unavailable.correct is False
    assert abstain.correct is True


def test_unreadable_judge_reply_is_retried_then_recorded_as_failure(server, responder):
    async def run():
        async with _client(server) as llm:
            judge = Judge(llm, max_attempts=3)
            responder.inject("unreadable_label", tag="judge", times=1)
            recovered = await judge.judge("Dog's name?", "Max", "Max")
            responder.inject("unreadable_label", tag="judge", times=3)
            failed = await judge.judge("Dog's name?", "Max", "It is Max")
            return recovered, failed

    recovered, failed = asyncio.run(run())
    assert recovered.correct is True and recovered.attempts == 2
    assert failed.correct is None and failed.failed and failed.attempts == 3
    assert failed.error and failed.error.startswith("unparseable")
    assert len(failed.outputs) == 3
    # the retry carried the bad reply and a correction request, so it was not a cache replay
    retry = [r for r in server.requests if r.tag == "judge"][1]
    assert [m["role"] for m in retry.messages] == ["system", "user", "assistant", "user"]


def test_judge_endpoint_failure_is_recorded_not_guessed(server):
    async def run():
        async with _client(server, max_retries=1) as llm:
            server.inject("500", times=2, tag="judge")
            return await Judge(llm).judge("Dog's name?", "Max", "Max")

    result = asyncio.run(run())
    assert result.correct is None and result.error.startswith("llm_error")
    assert server.count("judge") == 2


def test_answer_on_empty_state_and_bad_question(server, embedder):
    async def run():
        async with _client(server) as llm:
            answerer = Answerer(llm, embedder)
            empty = await answerer.answer(MemoryState(embedder.dim), "What is my dog's name?", None)
            with pytest.raises(ValueError, match="question"):
                await answerer.answer(MemoryState(embedder.dim), "  ", None)
            return empty

    empty = asyncio.run(run())
    assert empty.answer == "Not answerable" and empty.retrieved_ids == []
    assert "<current_date>unknown</current_date>" in empty.messages[1]["content"]


def test_answer_endpoint_failure_raises_llm_error(server, embedder):
    from membuilder.llm import LLMError

    async def run():
        state = await _raw_state(embedder)
        async with _client(server, max_retries=0) as llm:
            server.inject("500", times=1, tag="answer")
            await Answerer(llm, embedder).answer(state, "What is the name of Melanie's dog?", None)

    with pytest.raises(LLMError):
        asyncio.run(run())


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('The answer names the same shelter. {"label": "CORRECT"}', True),
        ('It names another city.\n```json\n{"label": "WRONG"}\n```', False),
        ('{"label": "correct"}', None),  # the reference compares the label exactly
        ("CORRECT", None),  # no JSON object: unreadable, whatever the word
        ('{"verdict": "CORRECT"}', None),
        ('{"label": "CORRECT"', None),
        ("", None),
    ],
)
def test_generous_reading_follows_the_reference(reply, expected):
    from membuilder.judge import read_generous_label

    assert read_generous_label(reply) is expected


def test_generous_wording_asks_for_a_reason_then_the_label():
    from membuilder.judge import JUDGE_GENEROUS_SYSTEM, JUDGE_SYSTEM

    strict = build_judge_messages("Where?", "Paris", "In Paris")
    generous = build_judge_messages("Where?", "Paris", "In Paris", "generous")
    assert strict[1] == generous[1]  # same items, other instructions
    assert generous[0]["content"] == JUDGE_GENEROUS_SYSTEM != JUDGE_SYSTEM
    assert "one sentence" in JUDGE_GENEROUS_SYSTEM and '{"label": "CORRECT"}' in JUDGE_GENEROUS_SYSTEM
    with pytest.raises(ValueError):
        build_judge_messages("Where?", "Paris", "In Paris", "lenient")
