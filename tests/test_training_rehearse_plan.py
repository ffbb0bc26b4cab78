"""What ``membuilder rehearse`` picks and refuses before any model runs (no torch, no model)."""

from __future__ import annotations

import json


def _config(tmp_path, longmemeval_dir, **kw):
    from membuilder.training.rehearse import RehearsalConfig

    return RehearsalConfig(
        output_dir=tmp_path,
        longmemeval=longmemeval_dir / "longmemeval_oracle.json",
        locomo=tmp_path / "unused.json",
        split_file=longmemeval_dir / "longmemeval_splits.json",
        **kw,
    )


def test_default_conversations_are_the_rl_ones_with_the_shortest_first_sessions(tmp_path, longmemeval_dir):
    from membuilder.training.rehearse import _first_ids

    split = json.loads((longmemeval_dir / "longmemeval_splits.json").read_text())["rl"]
    items = json.loads((longmemeval_dir / "longmemeval_oracle.json").read_text())
    for sessions in (1, 2):
        chars = {
            it["question_id"]: sum(len(t["content"]) for s in it["haystack_sessions"][:sessions] for t in s)
            for it in items
            if it["question_id"] in set(split)
        }
        picked = _first_ids(_config(tmp_path, longmemeval_dir, sessions=sessions))
        assert len(picked) == 2 and set(picked) <= set(split)
        others = [c for q, c in chars.items() if q not in picked]
        assert max(chars[q] for q in picked) <= min(others)
        assert chars[picked[0]] <= chars[picked[1]]


def test_explicit_conversations_win(tmp_path, longmemeval_dir):
    from membuilder.training.rehearse import _first_ids

    cfg = _config(tmp_path, longmemeval_dir, conversations=("0100672e", "gpt4_31ff4165"))
    assert _first_ids(cfg) == ["0100672e", "gpt4_31ff4165"]


def test_a_missing_data_file_is_one_line_and_exit_2(tmp_path, capsys):
    from membuilder.cli import main

    missing = tmp_path / "nope.json"
    argv = ["rehearse", "--output-dir", str(tmp_path / "out"), "--longmemeval", str(missing)]
    argv += ["--locomo", str(missing)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{missing}: --longmemeval file not found"]
    assert not (tmp_path / "out").exists()


def test_every_model_call_it_makes_through_the_commands_gets_its_timeout(
    tmp_path, longmemeval_dir, monkeypatch
):
    """The data commands talk to a slow local model: each gets ``--timeout`` through the shared
    endpoint flags, parsed by the command's own parser; the exports call no model."""
    from membuilder.cli import build_parser
    from membuilder.training import rehearse

    seen: list[list[str]] = []
    monkeypatch.setattr("membuilder.cli.main", lambda argv: seen.append(argv) or 0)
    r = rehearse.Rehearsal(_config(tmp_path, longmemeval_dir))
    rehearse.make_data(r, "http://127.0.0.1:1/v1", "smol", tmp_path)
    assert [argv[0] for argv in seen] == ["trajectories", "qa-gen", "export-sft", "export-rl"]
    for argv in seen[:2]:
        assert build_parser(argv[0]).parse_args(argv).timeout == float(rehearse.COMMAND_TIMEOUT_S)


def test_a_failed_stage_is_reported_failed_not_done(tmp_path, longmemeval_dir):
    import pytest
    from membuilder.training.rehearse import Rehearsal, write_report

    r = Rehearsal(_config(tmp_path, longmemeval_dir))
    r.timed("data", lambda: None)

    def boom():
        raise RuntimeError("no RL rows")

    with pytest.raises(RuntimeError):
        r.timed("adrpo", boom)
    assert r.failed == {"adrpo": "RuntimeError: no RL rows"}
    assert set(r.timings) == {"data", "adrpo"}
    pytest.importorskip("matplotlib")
    text = write_report(r).read_text()
    assert "| data |" in text and "| done |" in text.split("| data |")[1].splitlines()[0]
    assert "FAILED: RuntimeError: no RL rows" in text.split("| adrpo |")[1].splitlines()[0]


def test_trajectories_made_under_other_served_bounds_are_not_reused(tmp_path, longmemeval_dir):
    import pytest
    from membuilder.training.rehearse import Rehearsal, _check_served_bounds

    traj = tmp_path / "traj"
    _check_served_bounds(Rehearsal(_config(tmp_path, longmemeval_dir)), traj)  # first run: recorded
    traj.mkdir()
    _check_served_bounds(Rehearsal(_config(tmp_path, longmemeval_dir)), traj)  # same bounds: reused
    with pytest.raises(ValueError, match="use a new --output-dir"):
        _check_served_bounds(Rehearsal(_config(tmp_path, longmemeval_dir, expert_memory_chars=400)), traj)
    (tmp_path / "traj.served_bounds.json").unlink()  # trajectories of a version that did not record them
    with pytest.raises(ValueError, match="unrecorded bounds"):
        _check_served_bounds(Rehearsal(_config(tmp_path, longmemeval_dir)), traj)
