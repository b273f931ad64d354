"""The throughput benchmark runs end to end at tiny sizes and fills every field."""

import json

from eval.throughput import Row, grid_rows, main


def test_tiny_benchmark_writes_complete_json(tmp_path):
    assert main(["--preset", "tiny", "--out", str(tmp_path), "--steps", "2", "--repeats", "2", "--ttft", "--hlo"]) == 0
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert report["copy_bandwidth_tb_s"] > 0
    names = [r["name"] for r in report["rows"]]
    assert "full" in names and any(n.startswith("adore") for n in names) and any("no-attention" in n for n in names)
    for r in report["rows"]:
        assert "error" not in r, r
        for key in ("step_ms", "tokens_per_s", "roofline_ms", "roofline_fraction", "bytes_per_step_gb", "peak_gb"):
            assert r[key] > 0, (key, r)
    full = next(r for r in report["rows"] if r["name"] == "full")
    stream = next(r for r in report["rows"] if r["name"].startswith("streaming"))
    assert stream["bytes_per_step_gb"] < full["bytes_per_step_gb"]  # m = 64 of 256 tokens
    assert "| tiny | full |" in (tmp_path / "throughput.md").read_text()
    assert full["ttft_s"] > 0 and (tmp_path / "tokens_per_s.png").stat().st_size > 1000
    assert len(list((tmp_path / "hlo").glob("*.hlo.txt"))) == len(report["rows"])  # --hlo: one program per row
    assert not (tmp_path / "rows.jsonl").exists()  # the resume file is gone once the report is whole


def test_grid_keeps_what_fits():
    rows = grid_rows(["llama2-7b"], 141e9, 2)
    assert Row("llama2-7b", "full", 8, 16384) in rows
    assert Row("llama2-7b", "full", 16, 16384) not in rows  # 16 x 8 GB of KV + 13.5 GB of weights
    assert Row("llama2-7b", "adore", 64, 32768) in rows
