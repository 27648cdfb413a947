import json

import pytest

from samfx.bench import cpu_isa, interleaved, markdown_table, write_results


def test_interleaved_rotates_the_order_and_times_every_candidate():
    calls = []
    timings = interleaved({name: (lambda n=name: calls.append(n)) for name in "abc"}, repeats=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(t.samples) == 3 and t.min <= t.median for t in timings.values())


def test_interleaved_refuses_no_repeats():
    with pytest.raises(ValueError, match="repeats"):
        interleaved({"a": lambda: None}, repeats=0)


def test_markdown_table_prints_missing_values_as_dashes():
    text = markdown_table([{"a": 1.0}, {"a": None}], [("A", "a", "{:.1f}"), ("twice", lambda r: r["a"] and 2 * r["a"], "{}")])
    assert text.splitlines()[2:] == ["| 1.0 | 2.0 |", "| - | - |"]


def test_results_record_the_isa_and_the_command(tmp_path):
    path = write_results(tmp_path / "r" / "out.json", {"rows": [1]})
    record = json.loads(path.read_text())
    assert record["rows"] == [1]
    assert record["environment"]["isa"] == cpu_isa()
    assert record["environment"]["isa"]["summary"]
    assert list(path.parent.iterdir()) == [path]  # no temporary left behind
