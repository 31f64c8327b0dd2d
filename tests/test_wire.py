"""The wire schema: every frame kind is accepted as built, and each kind of mistake is named."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from client_hook import wire


def test_every_frame_kind_of_a_run_validates(run_frames: Any) -> None:
    frames = run_frames(findings=True)
    assert {f["kind"] for f in frames} == set(wire.FRAME_KINDS)
    for f in frames:
        assert wire.validate_frame(f) is f
    assert wire.validate_batch(wire.batch(frames)) == frames


def test_nan_and_infinity_are_data_not_errors(run_frames: Any) -> None:
    f = wire.frame("scalars", run_id="r", seq=1, step=0, values={"loss": math.nan, "grad_norm": math.inf}, time=1.0)
    wire.validate_frame(f)
    stats = run_frames()[2]
    stats["rows"][0][wire.LAYER_STAT_COLUMNS.index("mean")] = math.nan
    stats["rows"][0][wire.LAYER_STAT_COLUMNS.index("max")] = -math.inf
    wire.validate_frame(stats)


def _broken(run_frames: Any, index: int, change: Any) -> dict[str, Any]:
    f = copy.deepcopy(run_frames(steps=1, findings=True)[index])
    change(f)
    return f


@pytest.mark.parametrize(
    ("index", "change", "expected"),
    [
        (1, lambda f: f.pop("step"), "missing field 'step'"),
        (1, lambda f: f.update(step="3"), "'step' must be a non-negative integer, but got '3'"),
        (1, lambda f: f.update(step=True), "'step' must be a non-negative integer, but got True"),
        (1, lambda f: f.update(kind="bogus"), "'kind' must be one of"),
        (1, lambda f: f.update(protocol=99), "'protocol' must be 1"),
        (1, lambda f: f.update(values={"loss": True}), "'loss': True is not"),
        (1, lambda f: f.update(values={"loss": "1.5"}), "'loss': '1.5' is not"),
        (0, lambda f: f.pop("model"), "'run_start' frame is missing field 'model'"),
        (0, lambda f: f.update(model={"layers": []}), "'model' must be an object with a 'modules' list"),
        (2, lambda f: f["rows"][0].pop(), "row 0 is"),
        (2, lambda f: f["rows"][0].__setitem__(2, "bogus"), "'kind' must be one of ['weight', 'grad', 'activation']"),
        (2, lambda f: f["rows"][0].__setitem__(3, True), "'mean' must be a number or null, but got True"),
        (2, lambda f: f["rows"][0].__setitem__(11, 1.5), "'numel' must be a non-negative integer, but got 1.5"),
        (3, lambda f: f["rows"][0][5].pop(), "'counts' must be a list of 32 non-negative integers"),
        (4, lambda f: f.update(grads_stale="no"), "'grads_stale' must be true, false or null, but got 'no'"),
        (4, lambda f: f.update(target_counts={"0": -1}), "'target_counts' must be an object of class -> non-negative"),
        (4, lambda f: f.update(nonfinite_grads="fc.weight"), "'nonfinite_grads' must be a list of names"),
        (5, lambda f: f["findings"][0].update(severity="fatal"), "finding 0 has severity 'fatal', not one of"),
        (6, lambda f: f.update(time=math.nan), "'heartbeat' frame: field 'time' must be a finite number"),
        (6, lambda f: f.update(dropped={"histograms": -1}), "'dropped' must be an object of {reason: count}"),
        (7, lambda f: f.update(status="done"), "'status' must be one of ['finished', 'crashed'], but got 'done'"),
    ],
)
def test_bad_frames_are_rejected_naming_field_and_value(
    run_frames: Any, index: int, change: Any, expected: str
) -> None:
    bad = _broken(run_frames, index, change)
    with pytest.raises(wire.SchemaError) as info:
        wire.validate_frame(bad)
    assert expected in str(info.value)
    # In a batch, the error also says which frame it is (run_start, scalars, stats, histograms,
    # signals, findings, heartbeat, end).
    frames = run_frames(steps=1, findings=True)
    frames[index] = bad
    with pytest.raises(wire.SchemaError, match=rf"^frame {index}"):
        wire.validate_batch(wire.batch(frames))


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ([], "a message must be an object"),
        ({"protocol": 2, "frames": []}, "unsupported protocol version 2"),
        ({"protocol": 1, "frames": []}, "'frames' must be a non-empty list"),
        ({"protocol": 1, "frames": [42]}, "frame 0: a frame must be an object, but got 42"),
    ],
)
def test_bad_envelopes_are_rejected(message: Any, expected: str) -> None:
    with pytest.raises(wire.SchemaError, match=expected.replace("(", r"\(")):
        wire.validate_batch(message)


def test_a_rank_of_a_distributed_run_is_checked_and_sends_only_what_differs_per_rank(run_frames: Any) -> None:
    frames = run_frames(steps=1, findings=True)
    for f in frames:
        wire.validate_frame({**f, "rank": 0})  # rank 0 may send every kind
    for f in frames:
        ranked = {**f, "rank": 3}
        if f["kind"] in wire.RANK_KINDS:
            assert wire.validate_frame(ranked) is ranked
        else:
            expected = rf"'{f['kind']}' frames come from rank 0 only .* but got rank 3"
            with pytest.raises(wire.SchemaError, match=expected):
                wire.validate_frame(ranked)
    for bad in ("1", -1, True, 1.0, wire.MAX_RANK + 1):
        with pytest.raises(wire.SchemaError, match=r"field 'rank' must be a process rank: an integer from 0 to"):
            wire.validate_frame({**frames[1], "rank": bad})
    assert wire.frame("heartbeat", run_id="r", seq=0, step=0, time=1.0) == wire.frame(
        "heartbeat", run_id="r", seq=0, step=0, rank=None, time=1.0
    )
    assert wire.frame("heartbeat", run_id="r", seq=0, step=0, rank=2, time=1.0)["rank"] == 2


def test_acks_and_scalar_keys_per_rank() -> None:
    message = wire.ack({"r": [0, 1]}, {"r": {"2": [5]}})
    assert wire.acked_seqs(message, "r") == wire.acked_seqs(message, "r", 0) == [0, 1]
    assert wire.acked_seqs(message, "r", 2) == [5] and wire.acked_seqs(message, "r", 1) == []
    assert wire.ack({"r": [0]}) == {"kind": "ack", "seqs": {"r": [0]}}  # as before there were ranks
    assert [wire.rank_key("loss", r) for r in (None, 0, 1)] == ["loss", "loss", "loss/rank1"]
    for key in ("loss", "loss/rank1", "lr/1", "a/rank", "a/rank01", "val/loss/rank12"):
        base, rank = wire.key_rank(key)
        assert wire.rank_key(base, rank) == key
    assert wire.key_rank("val/loss/rank12") == ("val/loss", 12) and wire.key_rank("a/rank01") == ("a/rank01", 0)


def test_a_batch_is_split_into_its_valid_frames_and_refusals_by_index() -> None:
    start = wire.frame("run_start", run_id="r", seq=0, step=0, name="n", project="p", time=1.0, model={"modules": []})
    good = wire.frame("scalars", run_id="r", seq=1, step=0, values={"loss": 1.0}, time=1.0)
    bad = wire.frame("scalars", run_id="r", seq=2, step=0, values={"": 1.0}, time=1.0)
    frames, refused = wire.split_batch(wire.batch([start, good, bad, 7]))
    assert frames == [start, good]
    assert [(r["index"], r.get("seq")) for r in refused] == [(2, 2), (3, None)]
    assert refused[0]["error"].startswith("frame 2 ('scalars'): ")
    assert "a frame must be an object" in refused[1]["error"]
    # A refused run_start takes the later frames of its run with it: that run does not exist.
    broken = {**start, "name": ""}
    frames, refused = wire.split_batch(wire.batch([broken, good]))
    assert frames == [] and [r["index"] for r in refused] == [0, 1]
    assert "the run_start of run 'r' (frame 0) was refused" in refused[1]["error"]
    with pytest.raises(wire.SchemaError, match="frame 2"):
        wire.validate_batch(wire.batch([start, good, bad]))  # the strict form still names the first


def test_fitted_names_are_valid_stable_and_distinct() -> None:
    long_a, long_b = "a" * 300 + "1", "a" * 300 + "2"
    fit_a, fit_b = wire.fit_name(long_a), wire.fit_name(long_b)
    assert len(fit_a) == wire.MAX_NAME_LEN and fit_a == wire.fit_name(long_a) and fit_a != fit_b
    assert wire.fit_name("", nonempty=True) == wire.EMPTY_NAME and wire.fit_name("") == ""
    fields, fixed = wire.fit_names("scalars", {"values": {"": 1.0, "ok": 2.0}, "time": 1.0})
    assert fields["values"] == {wire.EMPTY_NAME: 1.0, "ok": 2.0} and fixed == [("", wire.EMPTY_NAME)]
    rows = [[long_a, "weight", "weight", 1.0]]
    fields, fixed = wire.fit_names("layer_stats", {"rows": rows})
    assert fields["rows"][0][0] == fit_a and rows[0][0] == long_a  # the caller's rows are not changed
    untouched = {"rows": [["fc", "weight", "grad", 1.0]]}
    assert wire.fit_names("layer_stats", untouched) == (untouched, [])
