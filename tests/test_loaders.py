"""Dataset loaders: the official files load into the common shape; bad files name file and field."""

from __future__ import annotations

import gzip
import json
import lzma
from collections import Counter
from pathlib import Path

import pytest
from membuilder import InvalidArgumentError
from membuilder.datasets import (
    NOT_MENTIONED,
    DatasetError,
    load_dataset,
    load_locomo,
    load_longmemeval,
    load_perltqa,
    load_splits,
    read_id_list,
)
from membuilder.datasets.locomo import normalize_evidence, parse_locomo_datetime
from membuilder.datasets.longmemeval import parse_longmemeval_date

FIXTURES = Path(__file__).parent / "fixtures" / "perltqa"


# --------------------------------------------------------------------------------------------
# LoCoMo
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locomo(locomo_path: Path):
    return load_locomo(locomo_path)


def test_locomo_counts_match_the_release(locomo) -> None:
    assert len(locomo.conversations) == 10
    assert sum(len(c.sessions) for c in locomo.conversations) == 272
    assert sum(c.num_turns for c in locomo.conversations) == 5882
    assert len(locomo.questions) == 1986
    counts = Counter(q.category_id for q in locomo.questions)
    assert counts == {1: 282, 2: 321, 3: 96, 4: 841, 5: 446}
    # The headline set leaves out the adversarial category.
    assert sum(not q.is_abstention for q in locomo.questions) == 1540


def test_locomo_sessions_turns_and_captions(locomo) -> None:
    conv = locomo.conversation("conv-26")
    assert conv.meta["speaker_a"] == "Caroline" and conv.meta["speaker_b"] == "Melanie"
    first = conv.sessions[0]
    assert (first.index, first.id, first.timestamp) == (0, "session_1", "1:56 pm on 8 May, 2023")
    assert [s.index for s in conv.sessions] == list(range(len(conv.sessions)))
    # conv-26 lists date-times for 35 sessions but contains 19; only real sessions are kept.
    assert len(conv.sessions) == 19
    t = first.turns[0]
    assert (t.id, t.speaker, t.role) == ("D1:1", "Caroline", "user")
    assert first.turns[1].role == "assistant"
    shared = next(t for t in first.turns if t.image_caption)
    msg = next(m for m in first.messages() if m["turn_id"] == shared.id)
    assert msg["content"] == shared.text and msg["image_caption"] == shared.image_caption
    assert shared.image_caption in shared.content()
    assert parse_locomo_datetime(first.timestamp).isoformat() == "2023-05-08T13:56:00"


def test_locomo_questions_evidence_and_adversarial(locomo) -> None:
    q = locomo.questions[0]
    assert q.id == "conv-26/q0" and q.category == "temporal" and q.category_id == 2
    assert q.evidence_turns == ("D1:3",) and q.evidence_sessions == ("session_1",)
    assert q.asked_at == locomo.conversation("conv-26").sessions[-1].timestamp
    adv = next(q for q in locomo.questions if q.category_id == 5)
    assert adv.is_abstention and adv.answer == NOT_MENTIONED
    assert adv.adversarial_answer == "self-care is important"
    # Malformed evidence strings of the release are split and normalised.
    split = next(q for q in locomo.questions if {"D8:6", "D9:17"} <= set(q.evidence_turns))
    assert {"session_8", "session_9"} <= set(split.evidence_sessions)
    assert normalize_evidence("D:11:26") == ["D11:26"]
    assert normalize_evidence("D30:05") == ["D30:5"]
    assert normalize_evidence("D9:1 D4:4") == ["D9:1", "D4:4"]
    assert normalize_evidence("D") == []
    # Ids that still name no turn are reported, never dropped silently.
    unresolved = [q for q in locomo.questions if q.meta.get("unresolved_evidence")]
    assert unresolved and all(q.conversation_id in {"conv-42", "conv-47"} for q in unresolved)
    # Integer answers in the release become text.
    assert all(isinstance(q.answer, str) and q.answer for q in locomo.questions)


def test_locomo_select_and_ids(locomo_path: Path) -> None:
    ds = load_dataset("locomo", locomo_path, ids=["conv-30", "conv-26"])
    assert [c.id for c in ds.conversations] == ["conv-30", "conv-26"]
    assert {q.conversation_id for q in ds.questions} == {"conv-26", "conv-30"}
    small = ds.select(max_sessions=2, max_questions=3)
    assert all(len(c.sessions) == 2 for c in small.conversations)
    assert len(small.questions) == 6
    with pytest.raises(InvalidArgumentError, match="conv-99"):
        load_dataset("locomo", locomo_path, ids=["conv-99"])
    with pytest.raises(InvalidArgumentError, match="longmemeval only"):
        load_dataset("locomo", locomo_path, split="test")


def _locomo_sample() -> dict:
    return {
        "sample_id": "tiny",
        "conversation": {
            "speaker_a": "Ann",
            "speaker_b": "Bo",
            "session_1_date_time": "9:00 am on 1 March, 2023",
            "session_1": [
                {"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a cat."},
                {"speaker": "Bo", "dia_id": "D1:2", "text": "Nice!"},
            ],
        },
        "qa": [{"question": "What did Ann adopt?", "answer": "a cat", "evidence": ["D1:1"], "category": 4}],
    }


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: s["conversation"].pop("speaker_a"), "[0].conversation.speaker_a"),
        (lambda s: s["conversation"]["session_1"][1].pop("dia_id"), "[0].conversation.session_1[1].dia_id"),
        (lambda s: s["conversation"].pop("session_1_date_time"), "[0].conversation.session_1_date_time"),
        (lambda s: s["qa"][0].update(category=9), "[0].qa[0].category"),
        (lambda s: s["qa"][0].update(category="4"), "[0].qa[0].category"),
        (lambda s: s["qa"][0].pop("answer"), "[0].qa[0].answer"),
        (lambda s: s["qa"][0].update(evidence="D1:1"), "[0].qa[0].evidence"),
        (lambda s: s.pop("sample_id"), "[0].sample_id"),
    ],
)
def test_locomo_malformed_names_file_and_field(tmp_path: Path, mutate, field: str) -> None:
    sample = _locomo_sample()
    load_path = tmp_path / "locomo.json"
    load_path.write_text(json.dumps([sample]))
    assert len(load_locomo(load_path).questions) == 1
    mutate(sample)
    load_path.write_text(json.dumps([sample]))
    with pytest.raises(DatasetError) as err:
        load_locomo(load_path)
    assert err.value.field == field
    assert str(load_path) in str(err.value) and field in str(err.value)


def test_missing_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="file not found") as err:
        load_locomo(tmp_path / "nope.json")
    assert err.value.path.endswith("nope.json") and err.value.field is None
    bad = tmp_path / "cut.json"
    bad.write_text(json.dumps([_locomo_sample()])[:100])
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_locomo(bad)
    with pytest.raises(DatasetError, match="list of LoCoMo samples"):
        (tmp_path / "obj.json").write_text("{}")
        load_locomo(tmp_path / "obj.json")
    xz = tmp_path / "cut.json.xz"
    xz.write_bytes(lzma.compress(json.dumps([_locomo_sample()]).encode())[:-20])
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_locomo(xz)


# --------------------------------------------------------------------------------------------
# LongMemEval
# --------------------------------------------------------------------------------------------


def test_longmemeval_splits_file(longmemeval_dir: Path) -> None:
    splits = load_splits(longmemeval_dir / "longmemeval_splits.json")
    assert {k: len(v) for k, v in splits.items()} == {"sft": 50, "rl": 50, "test": 400}
    assert not set(splits["sft"]) & set(splits["rl"]) and not set(splits["rl"]) & set(splits["test"])


def test_longmemeval_oracle_test_split(longmemeval_dir: Path) -> None:
    ds = load_dataset("longmemeval", longmemeval_dir / "longmemeval_oracle.json", split="test")
    splits = load_splits(longmemeval_dir / "longmemeval_splits.json")
    assert [q.id for q in ds.questions] == splits["test"]
    assert len(ds.conversations) == 400 and ds.meta["split"] == "test"
    abstention = [q for q in ds.questions if q.is_abstention]
    assert abstention and all(q.id.endswith("_abs") for q in abstention)
    assert {q.category for q in ds.questions} <= {
        "multi-session",
        "temporal-reasoning",
        "knowledge-update",
        "single-session-user",
        "single-session-assistant",
        "single-session-preference",
    }
    for conv, q in zip(ds.conversations, ds.questions):
        assert conv.id == q.id == q.conversation_id
        ids = {s.id for s in conv.sessions}
        assert set(q.evidence_sessions) <= ids
        # has_answer turns are evidence, and they live in the answer sessions
        turn_session = conv.turn_session()
        assert all(conv.sessions[turn_session[t]].id in q.evidence_sessions for t in q.evidence_turns)
        # sessions are built in time order
        dates = [parse_longmemeval_date(s.timestamp) for s in conv.sessions]
        assert dates == sorted(dates)
        assert q.asked_at and parse_longmemeval_date(q.asked_at)
        assert isinstance(q.answer, str) and q.answer
    assert any(q.evidence_turns for q in ds.questions)


def test_longmemeval_ids_order_and_missing(longmemeval_dir: Path) -> None:
    path = longmemeval_dir / "longmemeval_oracle.json"
    ds = load_longmemeval(path, ids=["031748ae_abs", "001be529", "no-such-id"])
    assert [q.id for q in ds.questions] == ["031748ae_abs", "001be529"]
    assert ds.meta["missing_ids"] == ["no-such-id"]
    with pytest.raises(InvalidArgumentError, match="none of the requested"):
        load_longmemeval(path, ids=["no-such-id"])
    with pytest.raises(InvalidArgumentError, match="unknown split"):
        load_longmemeval(path, split="train")


def _lme_record(qid: str = "q1", **changes) -> dict:
    rec = {
        "question_id": qid,
        "question_type": "single-session-user",
        "question": "What colour is my bike?",
        "answer": 7,
        "question_date": "2023/05/30 (Tue) 10:18",
        "haystack_session_ids": ["s_b", "s_a"],
        "haystack_dates": ["2023/05/21 (Sun) 19:50", "2023/05/20 (Sat) 08:00"],
        "haystack_sessions": [
            [
                {"role": "user", "content": "My bike is red.", "has_answer": True},
                {"role": "assistant", "content": "Nice."},
            ],
            [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}],
        ],
        "answer_session_ids": ["s_b"],
    }
    rec.update(changes)
    return rec


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz"])
def test_longmemeval_compressed_and_sorted(tmp_path: Path, suffix: str) -> None:
    raw = json.dumps([_lme_record(), _lme_record("q2_abs")]).encode()
    path = tmp_path / f"lme.json{suffix}"
    path.write_bytes({"": raw, ".gz": gzip.compress(raw), ".xz": lzma.compress(raw)}[suffix])
    ds = load_longmemeval(path)
    conv = ds.conversations[0]
    assert [s.id for s in conv.sessions] == ["s_a", "s_b"]  # chronological, not file order
    assert conv.meta["original_order"] == ["s_b", "s_a"]
    q = ds.questions[0]
    assert q.answer == "7" and q.evidence_turns == ("s_b:0",) and q.evidence_sessions == ("s_b",)
    assert not q.is_abstention and ds.questions[1].is_abstention


def test_longmemeval_split_file_beside_data(tmp_path: Path) -> None:
    (tmp_path / "lme.json").write_text(json.dumps([_lme_record("a"), _lme_record("b")]))
    (tmp_path / "longmemeval_splits.json").write_text(json.dumps({"sft": ["b"], "rl": [], "test": ["a"]}))
    assert [q.id for q in load_longmemeval(tmp_path / "lme.json", split="sft").questions] == ["b"]
    other = tmp_path / "mine.json"
    other.write_text(json.dumps({"test": ["b", "a"]}))
    ds = load_longmemeval(tmp_path / "lme.json", split="test", split_file=other)
    assert [q.id for q in ds.questions] == ["b", "a"]
    with pytest.raises(DatasetError, match="sft"):
        load_longmemeval(tmp_path / "lme.json", split="sft", split_file=other)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"haystack_dates": ["2023/05/21 (Sun) 19:50"]}, "[0].haystack_sessions"),
        ({"question": None}, "[0].question"),
        (
            {"haystack_sessions": [[{"role": "system", "content": "x"}], []]},
            "[0].haystack_sessions[0][0].role",
        ),
        ({"haystack_sessions": [[{"role": "user"}], []]}, "[0].haystack_sessions[0][0].content"),
        ({"answer_session_ids": [3]}, "[0].answer_session_ids[0]"),
        ({"question_id": 5}, "[0].question_id"),
    ],
)
def test_longmemeval_malformed(tmp_path: Path, changes: dict, field: str) -> None:
    path = tmp_path / "lme.json"
    path.write_text(json.dumps([_lme_record(**changes)]))
    with pytest.raises(DatasetError) as err:
        load_longmemeval(path)
    assert err.value.field == field and "lme.json" in str(err.value)


@pytest.mark.slow
def test_longmemeval_s_file_loads(longmemeval_dir: Path) -> None:
    path = longmemeval_dir / "longmemeval_s_498.json.xz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    ds = load_longmemeval(path, split="sft")
    assert len(ds.questions) == 50 - len(ds.meta.get("missing_ids", []))
    assert all(len(c.sessions) > 30 for c in ds.conversations)


# --------------------------------------------------------------------------------------------
# PerLTQA (hand-written fixture in the published layout)
# --------------------------------------------------------------------------------------------


def test_perltqa_fixture_layout() -> None:
    ds = load_dataset("perltqa", FIXTURES)
    assert [c.id for c in ds.conversations] == ["char_000", "char_001"]
    lena = ds.conversations[0]
    assert lena.meta["name"] == "Lena Moreau" and lena.meta["profile"]["Age"] == 34
    # dialogues in time order (one session per timestamp), then the events
    assert [s.id for s in lena.sessions] == ["7_0_0#0/0", "7_0_0#0/1", "7_1_0#1", "7_0_0", "7_1_0"]
    first = lena.sessions[0]
    assert first.timestamp == "2022-03-03 09:00"
    assert [(t.speaker, t.role) for t in first.turns][:2] == [
        ("Tomas Moreau", "assistant"),
        ("Lena Moreau", "user"),
    ]
    assert first.turns[1].text == "I'm glad! How many croissants did you bake?"
    assert Counter(q.category for q in ds.questions) == {
        "profile": 3,
        "social_relationship": 1,
        "events": 3,
        "dialogues": 3,
    }
    by_q = {q.question: q for q in ds.questions}
    ev = by_q["What did Lena paint on the bakery sign?"]
    assert ev.evidence_sessions == ("7_0_0", "7_0_0#0/0", "7_0_0#0/1")
    assert ev.meta["memory_anchors"] == [{"sea turtle": [98, 108]}]
    assert ev.meta["reference_memory"] == ["7_0_0"]
    dlg = by_q["What will Lena lend Aiko for the next trip?"]
    assert dlg.evidence_sessions == ("7_1_0#1",) and dlg.asked_at == "2022-08-20 18:30"
    assert by_q["What is Lena Moreau's nickname?"].evidence_sessions == ()


def test_perltqa_profile_session_and_selection() -> None:
    ds = load_perltqa(FIXTURES, include_profile=True, include_events=False)
    lena = ds.conversations[0]
    assert lena.sessions[0].id == "profile" and "Leni" in lena.sessions[0].turns[0].text
    assert all(not s.id.endswith("_0") for s in lena.sessions[1:])
    rel = next(q for q in ds.questions if q.category == "social_relationship")
    assert rel.evidence_sessions == ("profile",) and rel.evidence_turns == ("profile:7_0",)
    one = load_dataset("perltqa", FIXTURES, ids=["Omar Haddad"])
    assert [c.id for c in one.conversations] == ["char_001"] and len(one.questions) == 3


def test_perltqa_first_release_list_layout(tmp_path: Path) -> None:
    mem = json.loads((FIXTURES / "perltmem_en_v2.json").read_text())
    (tmp_path / "perltmem_en.json").write_text(json.dumps(list(mem.values())))
    qa = json.loads((FIXTURES / "perltqa_en_v2.json").read_text())
    (tmp_path / "perltqa_en.json").write_text(json.dumps(qa))
    ds = load_perltqa(tmp_path / "perltmem_en.json")
    assert [c.meta["name"] for c in ds.conversations] == ["Lena Moreau", "Omar Haddad"]
    assert len(ds.questions) == 10


def test_perltqa_errors(tmp_path: Path) -> None:
    (tmp_path / "perltmem_en_v2.json").write_text((FIXTURES / "perltmem_en_v2.json").read_text())
    with pytest.raises(DatasetError, match="perltqa"):
        load_perltqa(tmp_path)
    qa = json.loads((FIXTURES / "perltqa_en_v2.json").read_text())
    qa[0]["Lena Moreau"]["events"][0]["7_0_0"][0].pop("Question")
    (tmp_path / "perltqa_en_v2.json").write_text(json.dumps(qa))
    with pytest.raises(DatasetError) as err:
        load_perltqa(tmp_path)
    assert err.value.field == "[0].Lena Moreau.events[0].7_0_0[0].Question"
    assert "perltqa_en_v2.json" in err.value.path
    mem = json.loads((FIXTURES / "perltmem_en_v2.json").read_text())
    mem["Omar Haddad"]["dialogues"]["8_0_0#0"]["contents"]["2023-06-10 16:00"] = "not a list"
    (tmp_path / "perltmem_en_v2.json").write_text(json.dumps(mem))
    (tmp_path / "perltqa_en_v2.json").write_text((FIXTURES / "perltqa_en_v2.json").read_text())
    with pytest.raises(DatasetError, match="Speaker: utterance") as err:
        load_perltqa(tmp_path)
    assert "Omar Haddad" in err.value.field


def test_read_id_list(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(["x", "y"]))
    (tmp_path / "b.json").write_text(json.dumps({"sample_ids": ["z"]}))
    (tmp_path / "c.json").write_text(json.dumps({"other": 1}))
    assert read_id_list(tmp_path / "a.json") == ["x", "y"]
    assert read_id_list(tmp_path / "b.json") == ["z"]
    with pytest.raises(DatasetError, match="sample_ids"):
        read_id_list(tmp_path / "c.json")


def test_unknown_dataset_name() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown dataset"):
        load_dataset("nope", FIXTURES)
