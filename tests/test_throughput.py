"""The throughput benchmark runs end to end at tiny sizes and fills every field."""

import json

from adore_jax.kernels import get_attention_fn, get_cache_update_fn
from eval.throughput import Row, grid_rows, main, row_policy
from models.shapes import SHAPES


def test_tiny_benchmark_writes_complete_json(tmp_path, monkeypatch):
    import eval.throughput as tp

    measure = tp.copy_bandwidth  # measured for real, on 4 MiB: the tiny preset's 256 MiB copies take seconds here
    monkeypatch.setattr(tp, "copy_bandwidth", lambda nbytes: measure(nbytes // 64))
    assert main(["--preset", "tiny", "--out", str(tmp_path), "--steps", "2", "--repeats", "2", "--ttft", "--hlo"]) == 0
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert report["copy_bandwidth_tb_s"] > 0
    names = [r["name"] for r in report["rows"]]
    assert "full" in names and any(n.startswith("adore") for n in names) and any("no-attention" in n for n in names)
    assert any(n.endswith("hidden:1") for n in names)  # a controller reading the hidden state entering layer 1
    for r in report["rows"]:
        assert "error" not in r, r
        for key in ("step_ms", "tokens_per_s", "roofline_ms", "roofline_fraction", "bytes_per_step_gb", "peak_gb"):
            assert r[key] > 0, (key, r)
    full = next(r for r in report["rows"] if r["name"] == "full")
    stream = next(r for r in report["rows"] if r["name"].startswith("streaming"))
    assert stream["bytes_per_step_gb"] < full["bytes_per_step_gb"]  # m = 64 of 256 tokens
    assert "| tiny | full |" in (tmp_path / "throughput.md").read_text()
    assert full["ttft_s"] > 0 and (tmp_path / "tokens_per_s.png").stat().st_size > 1000
    assert (tmp_path / "ttft.png").stat().st_size > 1000
    assert full["prefill_temp_gb"] > 0 and all(r["program_temp_gb"] >= 0 for r in report["rows"])  # compiled sizes
    hlo = list((tmp_path / "hlo").glob("*.hlo.txt"))  # --hlo: one decode program per row, one prefill per TTFT
    assert len([h for h in hlo if not h.name.startswith("prefill_")]) == len(report["rows"])
    assert len([h for h in hlo if h.name.startswith("prefill_")]) == sum("ttft_s" in r for r in report["rows"])
    assert {r["layers"] for r in report["rows"]} == {"stacked", "unstacked"}  # the default (CPU: stacked) and the variant
    assert report["copy_bandwidth_by_method_tb_s"]["best"] == report["copy_bandwidth_tb_s"]
    assert not (tmp_path / "rows.jsonl").exists()  # the resume file is gone once the report is whole


def test_ttft_only_times_the_prefills_alone(tmp_path, monkeypatch):
    """--ttft-only: the full and adore (R = 0) rows get a TTFT and no decode timing."""
    import eval.throughput as tp

    monkeypatch.setattr(tp, "copy_bandwidth", lambda nbytes: {"best": 1e10})  # measured in the test above
    assert main(["--preset", "tiny", "--out", str(tmp_path), "--ttft-only"]) == 0
    report = json.loads((tmp_path / "throughput.json").read_text())
    assert report["rows"] and {r["policy"] for r in report["rows"]} <= {"full", "adore"}
    for r in report["rows"]:
        assert r["ttft_s"] > 0 and "step_ms" not in r and not r["rebuild"], r
    assert f"| {report['rows'][0]['ttft_s']:.2f} |" in (tmp_path / "throughput.md").read_text()
    # --prefill-group 1: the batch of 2 prefilled one sequence at a time, with fewer temporaries
    assert main(["--preset", "tiny", "--out", str(tmp_path / "g1"), "--ttft-only", "--prefill-group", "1"]) == 0
    grouped = json.loads((tmp_path / "g1" / "throughput.json").read_text())
    assert grouped["command"].endswith("--prefill-group 1")
    for a, b in zip(grouped["rows"], report["rows"]):
        assert a["ttft_s"] > 0 and a["prefill_temp_gb"] < b["prefill_temp_gb"], (a, b)


def test_grid_keeps_what_fits():
    rows = grid_rows(["llama2-7b"], 141e9, 2)
    assert Row("llama2-7b", "full", 8, 16384) in rows
    assert Row("llama2-7b", "full", 16, 16384) not in rows  # 16 x 8 GB of KV + 13.5 GB of weights
    assert Row("llama2-7b", "adore", 64, 32768) in rows


def test_fixed_budget_batches_fit_their_compiled_programs():
    """The fixed-budget rows' batches are checked against the compiled decode
    program's peak (abstract inputs): each fits in 95% of the limit."""
    import jax
    import jax.numpy as jnp

    from eval.throughput import _program, fixed_budget_rows, program_peak_bytes
    from models.llama import init_params
    from models.shapes import SHAPES

    cfg, ctx = SHAPES["tiny"], 4096
    ref = (get_attention_fn("reference"), get_cache_update_fn("reference"), None)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), jnp.float32))
    one = program_peak_bytes(_program(cfg, params, Row("tiny", "full", 1, ctx), 2, 1, ref)[0])
    limit = 6 * one  # room for a few sequences of full attention
    rows = fixed_budget_rows(cfg, jnp.float32, limit, 2, 1, ref, context=ctx, shape="tiny")
    assert [r.policy for r in rows] == ["full", "adore"]
    for r in rows:
        assert r.batch >= 1
        assert program_peak_bytes(_program(cfg, params, r, 2, 1, ref)[0]) <= 0.95 * limit
    assert rows[1].batch > rows[0].batch  # 1024 slots against 4096 tokens of KV per sequence


def test_fixed_budget_lowers_the_batch_after_a_run_out_of_memory(tmp_path, monkeypatch):
    """A fixed-budget row whose run fails with RESOURCE_EXHAUSTED is followed by the
    same row at 80% of the batch (in the policy's steps), also when resumed."""
    import eval.throughput as tp

    fixed = [Row("tiny", "full", 8, 128, cache_size=64), Row("tiny", "adore", 16, 128, cache_size=64)]
    monkeypatch.setattr(tp, "preset_rows", lambda preset: [])
    monkeypatch.setattr(tp, "fixed_budget_rows", lambda *a, **k: list(fixed))
    calls = []

    def measure(cfg, params, row, *a, **k):
        calls.append((row.policy, row.batch))
        if row.batch > 5:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 40.00GiB")
        return {"step_ms": 1.0, "tokens_per_s": row.batch * 1e3, "peak_gb": 0.1, "program_temp_gb": 0.0,
                "device_bytes_in_use_gb": 0.0}

    monkeypatch.setattr(tp, "measure_row", measure)
    monkeypatch.setattr(tp, "copy_bandwidth", lambda nbytes: {"best": 1e10})
    argv = ["--preset", "tiny", "--fixed-budget", "--no-hf", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert calls == [("full", 8), ("full", 6), ("full", 4), ("adore", 16), ("adore", 8)]  # 8 * 0.8 // 8 = 0: stop
    rows = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert [("error" in r, r["batch"]) for r in rows if r["policy"] == "full"] == [(True, 8), (True, 6), (False, 4)]

    calls.clear()  # resumed after the B=8 failure: B=8 is not run again
    (tmp_path / "rows.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert main(argv) == 0
    assert calls == [("full", 6), ("full", 4), ("adore", 16), ("adore", 8)]


def test_random_params_are_init_params_in_the_default_layout():
    """The benchmark's weights: init_params' values, placed on the device in the
    default layer layout (re-placed from the host, which must not change them)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from eval.throughput import random_params
    from models.llama import default_layout, init_params, unstack_layers
    from models.shapes import SHAPES

    cfg = SHAPES["tiny"]
    got = random_params(cfg, jnp.float32)
    assert isinstance(got.layers, tuple) == (default_layout() == "unstacked")
    want = unstack_layers(init_params(cfg, jax.random.key(0), jnp.float32))
    got = unstack_layers(got)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert isinstance(a, jax.Array) and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ttft_on_gpu_can_be_timed_against_blockwise_too():
    """On GPU, TTFT can also be timed through blockwise_attention (the prefill
    kernel's reference) in the same run; elsewhere once."""
    from eval.throughput import ttft_kernels

    update = get_cache_update_fn("reference")
    assert list(ttft_kernels((get_attention_fn("reference"), update, None), blockwise=True)) == ["ttft_s"]
    both = ttft_kernels((get_attention_fn("pallas_gpu"), update, None), blockwise=True)
    assert list(both) == ["ttft_s", "ttft_blockwise_s"]
    assert list(ttft_kernels((get_attention_fn("pallas_gpu"), update, None))) == ["ttft_s"]  # --ttft without --ttft-blockwise
    assert both["ttft_blockwise_s"][0]._fn.keywords["config"].prefill is None
    assert both["ttft_s"][0]._fn.keywords["config"].prefill is not None


def _report(command, bw, rows):
    return {"device": "cuda:0", "default_layout": "unstacked", "copy_bandwidth_tb_s": bw, "command": command,
            "rows": rows, "hf": []}


def test_merged_report_keeps_where_each_field_was_measured(tmp_path):
    """A grid split over runs: decode rows, then a --ttft-only run, then one row
    re-timed; each row's decode and TTFT fields come from the last run that measured them."""
    from eval.throughput_report import main as report_main

    row = lambda name, B, **f: {"shape": "llama2-7b", "policy": name, "batch": B, "context": 2048, "cache_size": 1024,
                                "rebuild": 0, "rebuild_every": 1, "variant": "", "name": name, "layers": "unstacked", **f}
    decode = lambda ms: dict(step_ms=ms, tokens_per_s=1e3 / ms, peak_gb=1.0, roofline_ms=1.0, roofline_fraction=1 / ms)
    hf = lambda ms: {"shape": "llama2-7b", "batch": 1, "context": 2048, "cache": "dynamic", "step_ms": ms}
    runs = [_report("grid a", 4.2, [row("full", 1, **decode(6.0)), row("full", 8, **decode(9.0))]),
            _report("grid ttft", 4.1, [row("full", 1, ttft_s=0.5), row("full", 8, ttft_error="RESOURCE_EXHAUSTED")]),
            _report("grid b1", 4.3, [row("full", 1, **decode(4.0))])]
    runs[0]["hf"], runs[2]["hf"] = [hf(30.0)], [hf(25.0)]
    files = []
    for i, rep in enumerate(runs):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(rep))
    assert report_main([*map(str, files), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "throughput.json").read_text())
    b1, b8 = merged["rows"]
    assert (b1["step_ms"], b1["decode_part"], b1["ttft_s"], b1["ttft_part"]) == (4.0, 2, 0.5, 1)
    assert (b8["step_ms"], b8["decode_part"], b8["ttft_part"]) == (9.0, 0, 1) and "ttft_s" not in b8
    assert [p["command"] for p in merged["parts"]] == ["grid a", "grid ttft", "grid b1"]
    assert [h["step_ms"] for h in merged["hf"]] == [25.0]  # the later run's HF row
    table = (tmp_path / "merged" / "throughput.md").read_text()
    assert "| llama2-7b | full | 1 | 2048 | 4.00 |" in table and "RESOURCE_EXHAUSTED" in table and "`grid b1`" in table
    assert (tmp_path / "merged" / "ttft.png").stat().st_size > 1000
    again = tmp_path / "again"  # a merged report merges again, its runs kept
    assert report_main([str(tmp_path / "merged" / "throughput.json"), "--out", str(again)]) == 0
    assert json.loads((again / "throughput.json").read_text())["rows"] == merged["rows"]


def test_merge_keeps_the_shapes_asked_for(tmp_path):
    """--shapes splits a run over both shapes (an HF grid) into per-shape reports;
    the tokens/s plot draws the HF rows of its panels."""
    from eval.throughput_report import main as report_main

    row = lambda shape, ctx: {"shape": shape, "policy": "full", "batch": 8, "context": ctx, "cache_size": 1024,
                              "rebuild": 0, "rebuild_every": 1, "variant": "", "name": "full", "layers": "unstacked",
                              "step_ms": 2.0, "tokens_per_s": 4e3, "peak_gb": 1.0, "roofline_ms": 1.0, "roofline_fraction": 0.5}
    hf = lambda shape, ctx, cache: {"shape": shape, "batch": 8, "context": ctx, "cache": cache, "step_ms": 30.0}
    rep = _report("grid", 4.2, [row(s, c) for s in ("llama2-7b", "smollm2-135m") for c in (2048, 8192)])
    rep["hf"] = [hf(s, c, k) for s in ("llama2-7b", "smollm2-135m") for c in (2048, 8192) for k in ("dynamic", "static")]
    (tmp_path / "a.json").write_text(json.dumps(rep))
    plots = []
    for shapes in ("smollm2-135m", None):
        out = tmp_path / str(shapes)
        assert report_main([str(tmp_path / "a.json"), "--out", str(out), *(["--shapes", shapes] if shapes else [])]) == 0
        merged = json.loads((out / "throughput.json").read_text())
        want = {"smollm2-135m"} if shapes else {"llama2-7b", "smollm2-135m"}
        assert {r["shape"] for r in merged["rows"]} == {h["shape"] for h in merged["hf"]} == want
        assert len(merged["hf"]) == 4 * len(want)
        plots.append((out / "tokens_per_s.png").read_bytes())
    assert report_main([str(tmp_path / "a.json"), "--out", str(tmp_path / "typo"), "--shapes", "llama2_7b"]) == 2
    assert not (tmp_path / "typo").exists()  # a shape no row has: an error, no empty report
    rep["hf"] = []  # the same rows without HF draw a different plot
    (tmp_path / "a.json").write_text(json.dumps(rep))
    assert report_main([str(tmp_path / "a.json"), "--out", str(tmp_path / "no_hf"), "--shapes", "smollm2-135m"]) == 0
    assert (tmp_path / "no_hf" / "tokens_per_s.png").read_bytes() != plots[0]


def test_merging_a_file_that_is_not_a_report_fails_cleanly(tmp_path, capsys):
    from eval.throughput_report import main as report_main

    (tmp_path / "x.json").write_text("[1, 2]")
    assert report_main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2
    assert report_main([str(tmp_path / "x.json"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "not an eval.throughput report" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_hf_reference_times_each_point_once(tmp_path):
    """The transformers reference (on CPU here): dynamic and static cache per point;
    a resumed run keeps the rows it has and times only the new points."""
    from eval.throughput import hf_points, hf_reference

    saved = []
    rows = hf_reference(hf_points([("tiny", 2, 32)]), device="cpu", save=lambda r: saved.append(list(r)))
    assert [r["cache"] for r in rows] == ["dynamic", "static"] and all(r["step_ms"] > 0 for r in rows), rows
    assert len(saved) == 2 and saved[-1] == rows
    more = hf_reference(hf_points([("tiny", 2, 32), ("tiny", 1, 48)]), device="cpu", done=rows,
                        save=lambda r: saved.append(list(r)))
    assert more[:2] == rows and [(r["batch"], r["context"]) for r in more[2:]] == [(1, 48), (1, 48)]
    assert len(saved) == 4


def test_contradictory_flags_are_refused(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["--hf-only", "--no-hf"])
    assert e.value.code == 2 and "--hf-only excludes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--hf-only", "--preset", "tiny"])
    assert e.value.code == 2 and "no transformers reference" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # chunks of 12 steps would rebuild at steps 1 and 9 of each
        main(["--preset", "grid", "--steps", "12"])
    assert e.value.code == 2 and "multiple of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--prefill-group", "0"])
    assert e.value.code == 2 and "--prefill-group must be >= 1" in capsys.readouterr().err


def test_command_records_the_settings_that_change_results():
    from eval.throughput import command_line

    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", "XLA_FLAGS": "--xla_gpu_enable_command_buffer= --x=1", "HOME": "/r"}
    assert command_line(["--preset", "grid", "--batches", "64"], env) == (
        "XLA_FLAGS='--xla_gpu_enable_command_buffer= --x=1' XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 "
        "python -m eval.throughput --preset grid --batches 64")
    assert command_line([], {}) == "python -m eval.throughput"


def test_row_variants_pick_their_kernels():
    """Each step-breakdown variant replaces only its own kernel; xla-matmul runs
    the projections with XLA's matmul (None), the reference of the few-row kernels."""
    from adore_jax.kernels import get_matmul_fn
    from eval.throughput import Row, _no_attention, _no_update, row_kernels

    kernels = (get_attention_fn("pallas_gpu"), get_cache_update_fn("pallas_gpu"), get_matmul_fn("pallas_gpu"))
    row = lambda v: Row("tiny", "adore", 2, 256, variant=v)
    assert row_kernels(row(""), kernels) == kernels
    assert row_kernels(row("xla-matmul"), kernels) == (*kernels[:2], None)
    assert row_kernels(row("no-attention"), kernels) == (_no_attention, *kernels[1:])
    assert row_kernels(row("no-update"), kernels) == (kernels[0], _no_update, kernels[2])


def test_row_policy_builds_the_controller_input_asked():
    cfg = SHAPES["tiny"]
    pol, state = row_policy(Row("tiny", "adore", 2, 256, cache_size=64, feature="hidden:1"), cfg)
    assert pol.feature_layer == 1 and state is not None
    assert row_policy(Row("tiny", "adore", 2, 256, cache_size=64), cfg)[0].feature_layer is None  # no packaged one
    assert row_policy(Row("tiny", "streaming", 2, 256, cache_size=64), cfg)[1] is None


def test_mesh_rows_are_timed_beside_the_one_device_rows(tmp_path, monkeypatch, capsys):
    """--mesh adds a twin of every row without a variant that runs under shard_map on
    that mesh (here one device); a bad mesh is refused."""
    import pytest

    import eval.throughput as tp

    monkeypatch.setattr(tp, "preset_rows", lambda preset: [Row("tiny", "adore", 2, 256, cache_size=64),
                                                            Row("tiny", "full", 2, 256, variant="no-attention")])
    monkeypatch.setattr(tp, "copy_bandwidth", lambda nbytes: {"best": 1e10})
    assert main(["--preset", "tiny", "--mesh", "data=1,model=1", "--no-hf", "--steps", "2", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "throughput.json").read_text())["rows"]}
    assert set(rows) == {"adore m=64 R=0", "full [no-attention]", "adore m=64 R=0 [mesh data=1,model=1]"}
    mesh = rows["adore m=64 R=0 [mesh data=1,model=1]"]
    assert mesh["mesh"] == "data=1,model=1" and mesh["step_ms"] > 0
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--mesh", "data=two", "--out", str(tmp_path)])
    assert "data=2,model=4" in capsys.readouterr().err


def test_8bit_cache_rows_are_timed_and_read_fewer_bytes(tmp_path, monkeypatch):
    """Rows with int8 / float8_e4m3 slots run (on one device and under shard_map on a
    one-device mesh, the scales split as the values), named by their cache dtype;
    their step reads K/V at 1 byte an element plus a 4-byte scale per slot and head."""
    import eval.throughput as tp
    from models.shapes import SHAPES

    assert [r.kv_dtype for r in tp.preset_rows("kvquant")] == ["", "", "int8", "int8", "float8_e4m3", "float8_e4m3"]
    rows = [Row("tiny", "adore", 2, 256, cache_size=64, kv_dtype="int8"), Row("tiny", "full", 2, 256, kv_dtype="float8_e4m3")]
    monkeypatch.setattr(tp, "preset_rows", lambda preset: rows)
    monkeypatch.setattr(tp, "copy_bandwidth", lambda nbytes: {"best": 1e10})
    assert main(["--preset", "tiny", "--mesh", "data=1,model=1", "--no-hf", "--steps", "2", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    got = {r["name"]: r for r in json.loads((tmp_path / "throughput.json").read_text())["rows"]}
    assert set(got) == {"adore m=64 R=0 [kv int8]", "full [kv float8_e4m3]", "adore m=64 R=0 [mesh data=1,model=1] [kv int8]",
                        "full [mesh data=1,model=1] [kv float8_e4m3]"}
    assert all(r["step_ms"] > 0 for r in got.values())
    cfg = SHAPES["tiny"]
    plain, int8 = (tp.step_bytes(cfg, {}, Row("tiny", "full", 2, 256, kv_dtype=kv), 4) for kv in ("", "int8"))
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads
    assert plain - int8 == 2 * 256 * per_token * (cfg.head_dim * 4 - (cfg.head_dim + 4))
