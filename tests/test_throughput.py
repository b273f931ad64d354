"""The throughput benchmark runs end to end at tiny sizes and fills every field."""

import json

from eval.throughput import main


def test_tiny_benchmark_writes_complete_json(tmp_path):
    assert main(["--preset", "tiny", "--out", str(tmp_path), "--steps", "2", "--repeats", "2"]) == 0
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert report["copy_bandwidth_tb_s"] > 0
    names = [r["name"] for r in report["rows"]]
    assert "full" in names and any(n.startswith("adore") for n in names) and any("no-attention" in n for n in names)
    for r in report["rows"]:
        assert "error" not in r, r
        for key in ("step_ms", "tokens_per_s", "roofline_ms", "roofline_fraction", "bytes_per_step_gb"):
            assert r[key] > 0, (key, r)
    full = next(r for r in report["rows"] if r["name"] == "full")
    stream = next(r for r in report["rows"] if r["name"].startswith("streaming"))
    assert stream["bytes_per_step_gb"] < full["bytes_per_step_gb"]  # m = 64 of 256 tokens
    assert "| tiny | full |" in (tmp_path / "throughput.md").read_text()
