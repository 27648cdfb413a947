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


def test_deployment_bench_times_every_runtime_and_leads_with_speed(tmp_path, capsys):
    import samfx
    from samfx.bench import deploy_table, deployment_bench
    from samfx.cli import main

    from .conftest import small_model

    original = small_model("sam_vit_b")
    optimized = samfx.optimize(original, ["split_qkv"])
    result = deployment_bench(original, optimized, runtimes=["eager", "openvino"], repeats=1, warmup=0, threads=1,
                              work_dir=tmp_path)
    rows = {row["case"]: row for row in result["rows"]}
    assert sorted(rows) == sorted(f"{m} / {r}" for m in ("original", "optimized") for r in ("eager", "openvino"))
    assert rows["original / eager"]["speedup"] == 1.0 and result["boxes"] == 24
    for row in rows.values():
        assert row["encoder_s"] > 0 and row["decoder_s"] > 0 and row["disk_bytes"] > 0
        assert row["box_mask_iou"] >= 0.999  # split_qkv is exact, and so are the exports
    assert rows["optimized / openvino"]["precision"] == "f32"
    table = deploy_table(result).splitlines()
    assert table[0].startswith("| case | x (image) | x (encoder) | encoder ms | decoder ms (24 boxes) | disk MB")
    assert result["isa"]["summary"] in table[-1]
    assert main(["bench", "--model", "sam_vit_b", "--small", "--runtimes", "eager,tflite", "--passes", "x"]) == 2
    assert "unknown runtimes ['tflite']" in capsys.readouterr().err
