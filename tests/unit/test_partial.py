"""The fast path keeps each finished batch's rows (`accel.partial`): a run killed after some batches decodes only
the rest when it resumes, with the tokens of an uninterrupted run (float32, CPU)."""

import json

import pytest
import torch

from refusal_direction.accel import fast_generation, static_decode
from refusal_direction.accel.fast_generation import generate_fast_sets
from refusal_direction.accel.partial import PartialResults, intervention_digest, unit_key
from refusal_direction.core.decoding import GenerationSettings
from refusal_direction.edits import ActivationAddition, Baseline, DirectionalAblation
from tests.helpers.generation_cases import INSTRUCTIONS, conditions
from tests.helpers.tiny import tiny_gemma

SETTINGS = GenerationSettings(max_new_tokens=12, stop_at_end_of_turn=True)


@pytest.fixture(scope="module")
def lm():
    return tiny_gemma(n_layers=2, hidden=64, seed=0)


def _sets(lm):
    ivs = conditions(lm)
    return [(INSTRUCTIONS, ivs), (INSTRUCTIONS[:3], [ivs[0], ivs[2]])]


def _ids(out):
    return [{name: [g.token_ids for g in gens] for name, gens in per_set.items()} for per_set in out]


class Killed(RuntimeError):
    pass


def _count_batches(monkeypatch, kill_after: int | None = None) -> list[int]:
    """Rows of each batch the fast path decodes; raise `Killed` instead of batch ``kill_after`` + 1."""
    real = static_decode.generate_chunk
    rows: list[int] = []

    def counted(lm, batch_rows, *args, **kwargs):
        if kill_after is not None and len(rows) == kill_after:
            raise Killed("kill -9")
        rows.append(len(batch_rows))
        return real(lm, batch_rows, *args, **kwargs)

    monkeypatch.setattr(fast_generation, "generate_chunk", counted)
    return rows


def test_a_killed_call_resumes_after_its_last_finished_batch(lm, tmp_path, monkeypatch):
    # 9 units (6 prompts x 3 conditions, then 3 prompts x 2), 2 per batch: 5 batches
    want = _ids(generate_fast_sets(lm, _sets(lm), SETTINGS, max_rows=6))
    partial = PartialResults(tmp_path / "partial.jsonl")
    _count_batches(monkeypatch, kill_after=2)
    with pytest.raises(Killed):
        generate_fast_sets(lm, _sets(lm), SETTINGS, max_rows=6, partial=partial)
    lines = (tmp_path / "partial.jsonl").read_text().splitlines()
    assert len(lines) == 12  # two finished batches of two units, a line per (prompt, condition)
    rows = _count_batches(monkeypatch)
    got = generate_fast_sets(lm, _sets(lm), SETTINGS, max_rows=6, partial=PartialResults(tmp_path / "partial.jsonl"))
    assert _ids(got) == want
    # only the last 2 prompts of the first set (3 conditions each); the second set's 3 prompts x 2 conditions are
    # rows the first set's finished batches already hold (the same prompt under the same intervention object)
    assert rows == [6]
    again = _count_batches(monkeypatch)
    assert _ids(generate_fast_sets(lm, _sets(lm), SETTINGS, partial=PartialResults(tmp_path / "partial.jsonl"))) \
        == want and again == []  # everything resumed: nothing decoded
    assert [g.text for g in got[0]["ablation"]] == [g.text for g in generate_fast_sets(
        lm, _sets(lm), SETTINGS)[0]["ablation"]]
    # fewer conditions than the killed call (e.g. some completion files were written): still all resumed
    ivs = _sets(lm)[0][1]
    last = _count_batches(monkeypatch)
    fewer = generate_fast_sets(lm, [(INSTRUCTIONS, [ivs[0], ivs[2]])], SETTINGS,
                               partial=PartialResults(tmp_path / "partial.jsonl"))
    assert last == [] and _ids(fewer)[0] == {k: want[0][k] for k in ("baseline", "actadd")}


def test_other_directions_or_budgets_are_not_taken_from_the_file(lm, tmp_path, monkeypatch):
    path = tmp_path / "partial.jsonl"
    generate_fast_sets(lm, _sets(lm), SETTINGS, partial=PartialResults(path))
    rows = _count_batches(monkeypatch)
    r = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(9))
    other = [(INSTRUCTIONS, [Baseline(), DirectionalAblation(r)])]
    generate_fast_sets(lm, other, SETTINGS, partial=PartialResults(path))
    assert sum(rows) == len(INSTRUCTIONS) * 2  # a new direction: every unit decoded
    generate_fast_sets(lm, _sets(lm), GenerationSettings(max_new_tokens=5), partial=PartialResults(path))
    assert rows == [len(INSTRUCTIONS) * 2, 6 * 3 + 3 * 2]  # another budget: every row of the sets again


def test_digests_follow_every_field():
    r = torch.ones(8)
    base = intervention_digest(ActivationAddition(r, layer=1))
    assert base == intervention_digest(ActivationAddition(torch.ones(8), layer=1))
    for other in (ActivationAddition(r, layer=2), ActivationAddition(r, layer=1, coeff=2.0),
                  ActivationAddition(r * 1.0001, layer=1), ActivationAddition(r, layer=1, name="other"),
                  DirectionalAblation(r)):
        assert intervention_digest(other) != base
    k = unit_key("m|torch.float32", [1, 2], ["a"], 8, [1], False)
    assert k != unit_key("m|torch.float32", [1, 2], ["a"], 8, [1], True) != unit_key("m|torch.bfloat16", [1, 2],
                                                                                      ["a"], 8, [1], False)


def test_torn_and_damaged_lines(tmp_path, caplog):
    path = tmp_path / "p.jsonl"
    store = PartialResults(path)
    store.put([("k1", {"a": ([1, 2], True)}), ("k2", {"a": ([3], False)})])
    text = path.read_text()
    path.write_text("not json\n" + text + '{"key": "k3", "condi')  # a damaged line and a kill mid-write
    store = PartialResults(path)
    assert store.get("k1") == {"a": ([1, 2], True)} and store.get("k2") == {"a": ([3], False)}
    assert store.get("k3") is None
    assert "line 1 is damaged" in caplog.text and "line 4" not in caplog.text  # the torn last line: silently
    store.put([("k3", {"b": ([4], True)})])
    assert json.loads(path.read_text().splitlines()[-1])["key"] == "k3"  # on a fresh line after the torn one
    caplog.clear()
    assert PartialResults(path).get("k3") == {"b": ([4], True)}
    assert "is damaged" not in caplog.text  # the damaged line was dropped when first read: reported once
    assert len(path.read_text().splitlines()) == 3
    store.remove()
    assert not path.exists() and store.get("k1") is None


def test_the_file_is_recorded_in_the_runs_manifest(tmp_path):
    from refusal_direction.fileio import manifest_entries, track_writes, untrack_writes

    track_writes(tmp_path)
    try:
        PartialResults(tmp_path / "generate_partial.jsonl").put([("k", {"a": ([1], True)})])
    finally:
        untrack_writes(tmp_path)
    assert "generate_partial.jsonl" in manifest_entries(tmp_path)  # so `--force` may delete it
