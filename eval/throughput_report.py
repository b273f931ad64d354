"""Reports of eval.throughput: the markdown table, the plots, and one report merged
from several runs (a grid split over calls, TTFT timed apart from the decode).

    python -m eval.throughput_report --out docs/results/throughput/grid A.json B.json ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DECODE_FIELDS = ("step_ms", "tokens_per_s", "peak_gb", "program_temp_gb", "device_bytes_in_use_gb", "bytes_per_step_gb",
                 "roofline_ms", "roofline_fraction", "error")
TTFT_FIELDS = ("ttft_s", "ttft_error", "ttft_blockwise_s", "ttft_blockwise_error", "prefill_temp_gb")


def write_report(report: dict, out: Path) -> str:
    """Writes OUT/throughput.{json,md}, tokens_per_s.png and (when a row has one)
    ttft.png; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(report, indent=2))
    table = render_table(report)
    (out / "throughput.md").write_text(table)
    plot_tokens_per_s(report["rows"], out / "tokens_per_s.png", report.get("hf", []))
    plot_ttft(report["rows"], out / "ttft.png")
    return table


def merge_reports(reports: list[dict], shapes=None) -> dict:
    """One report from several (later ones win). Rows are matched by (name, shape,
    batch, context), HF rows by (shape, batch, context, cache); a row's decode fields and its TTFT fields each come from the
    last run that measured them, recorded as `decode_part` / `ttft_part`: indices
    into `parts` (command and copy bandwidth per run; a merged input's own parts
    are kept). shapes: keep only the rows of these shapes (default: all)."""
    keep = lambda r: shapes is None or r["shape"] in shapes
    parts, rows = [], {}
    for rep in reports:
        base = len(parts)
        own = rep.get("parts") or [{"command": rep["command"], "copy_bandwidth_tb_s": rep["copy_bandwidth_tb_s"]}]
        parts += own
        for r in filter(keep, rep["rows"]):
            key = (r["name"], r["shape"], r["batch"], r["context"])
            row = rows.setdefault(key, {})
            for fields, tag in ((DECODE_FIELDS, "decode_part"), (TTFT_FIELDS, "ttft_part")):
                if any(f in r for f in fields):  # this run measured them: its values replace the earlier run's
                    for f in fields:
                        row.pop(f, None)
                    if tag in r:  # a merged report's row: its own run, renumbered
                        row[tag] = base + r[tag]
                    else:  # a single run's row (a merged report without the tag: unknown)
                        row[tag] = base if len(own) == 1 else None
            row.update({k: v for k, v in r.items() if k not in ("decode_part", "ttft_part")})
    hf = {(h["shape"], h["batch"], h["context"], h.get("cache")): h for rep in reports for h in filter(keep, rep.get("hf", []))}
    first = reports[0]
    return {"device": first["device"], "default_layout": first.get("default_layout", "stacked"),
            "copy_bandwidth_tb_s": min(p["copy_bandwidth_tb_s"] for p in parts), "parts": parts,
            "rows": list(rows.values()), "hf": list(hf.values())}


def _log_axes(ax, lines, xlabel: str, ylabel: str, title: str) -> None:
    """Log-log axes with the contexts of `lines` ([(context, value)] each) as ticks, in K."""
    import matplotlib

    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_xticks(sorted({c for pts in lines for c, _ in pts}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1024:g}K"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def _hf_tokens_per_s(h: dict) -> float:
    """Decode tokens/s of an HF reference row (batch / step time)."""
    return h["batch"] * 1e3 / h["step_ms"]


def plot_tokens_per_s(rows: list[dict], path: Path, hf: list[dict] = ()) -> None:
    """tokens/s against context length: one panel per (shape, batch) with at least
    two contexts measured, one line per policy, and grey lines for the HF
    transformers rows of the same (shape, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict = {}
    for r in rows:
        if "tokens_per_s" in r and not r["variant"]:
            panels.setdefault((r["shape"], r["batch"]), {}).setdefault(r["name"], []).append((r["context"], r["tokens_per_s"]))
    if not panels:  # --ttft-only: no decode rows
        return
    keep = sorted(k for k, lines in panels.items() if len({c for pts in lines.values() for c, _ in pts}) > 1)
    keep = keep or sorted(panels)[:1]
    ncols = min(4, max(1, len(keep)))
    nrows = max(1, -(-len(keep) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keep):
        for name, pts in sorted(panels[key].items()):
            pts.sort()
            ax.plot(*zip(*pts), marker="o", label=name)
        for cache, style in (("dynamic", ":"), ("static", "-.")):
            pts = sorted((h["context"], _hf_tokens_per_s(h)) for h in hf if "step_ms" in h
                         and (h["shape"], h["batch"]) == key and h.get("cache", "dynamic") == cache)
            if pts:
                ax.plot(*zip(*pts), marker="x", color="grey", linestyle=style, label=f"HF ({cache} cache)")
        _log_axes(ax, panels[key].values(), "context (tokens)", "decode tokens/s", f"{key[0]}, B={key[1]}")
    for ax in list(axes.flat)[len(keep):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttft(rows: list[dict], path: Path) -> None:
    """Time to first token against context length: one panel per shape, one line
    per (policy, batch). Nothing is written when no row has a TTFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict = {}
    for r in rows:
        if "ttft_s" in r:
            panels.setdefault(r["shape"], {}).setdefault((r["batch"], r["name"]), []).append((r["context"], r["ttft_s"]))
    if not panels:
        return
    batches = sorted({b for lines in panels.values() for b, _ in lines})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (shape, lines) in zip(axes.flat, sorted(panels.items())):
        for (batch, name), pts in sorted(lines.items()):  # a colour per batch; full solid, the others dashed
            pts.sort()
            ax.plot(*zip(*pts), marker="o", label=f"{name}, B={batch}", color=f"C{batches.index(batch)}",
                    linestyle="-" if name == "full" else "--")
        _log_axes(ax, lines.values(), "prompt (tokens)", "time to first token (s)", shape)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_table(report: dict) -> str:
    """The report as a markdown table: one line per row, then the HF reference rows
    (and, for a merged report, the runs its rows come from)."""
    parts = report.get("parts", [])
    bw = [p["copy_bandwidth_tb_s"] for p in parts] or [report["copy_bandwidth_tb_s"]]
    lines = [(f"merged from {len(parts)} runs (listed below), copy bandwidth {min(bw):.2f}–{max(bw):.2f} TB/s (each "
              f"row's roofline uses its own run's)" if parts else
              f"copy bandwidth {bw[0]:.2f} TB/s (the best of XLA and torch copies)") + f" on {report['device']}; "
             f"layers {report.get('default_layout', 'stacked')} unless the row says otherwise", "",
             "| shape | policy | B | context | ms/step | tokens/s | roofline ms | of roofline | peak GB | TTFT s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['name']} | {r['batch']} | {r['context']} | {r['error'][:60]} | | | | | |")
            continue
        ttft = f"{r['ttft_s']:.2f}" if "ttft_s" in r else r.get("ttft_error", "")[:60]
        if "ttft_blockwise_s" in r:
            ttft += f" (blockwise {r['ttft_blockwise_s']:.2f})"
        if "step_ms" not in r:  # --ttft-only
            lines.append(f"| {r['shape']} | {r['name']} | {r['batch']} | {r['context']} | | | | | | {ttft} |")
            continue
        lines.append(f"| {r['shape']} | {r['name']} | {r['batch']} | {r['context']} | {r['step_ms']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['roofline_ms']:.2f} | {100 * r['roofline_fraction']:.0f}% | "
                     f"{r['peak_gb']:.1f} | {ttft} |")
    for h in report["hf"]:
        val = f"{h['step_ms']:.1f} | {_hf_tokens_per_s(h):.0f}" if "step_ms" in h else h["error"][:60] + " |"
        lines.append(f"| {h['shape']} | HF transformers (sdpa, {h.get('cache', 'dynamic')} cache) | {h['batch']} | "
                     f"{h['context']} | {val} | | | | |")
    if parts:
        lines += ["", "Runs (`decode_part`, `ttft_part` in the JSON rows):", ""]
        lines += [f"{i}. `{p['command']}` (copy {p['copy_bandwidth_tb_s']:.2f} TB/s)" for i, p in enumerate(parts)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """`python -m eval.throughput_report A.json B.json ... --out DIR`: merge runs into one report; exit status."""
    p = argparse.ArgumentParser(prog="python -m eval.throughput_report",
                                description="merge eval.throughput reports (later files win) into one")
    p.add_argument("reports", nargs="+", help="throughput.json files")
    p.add_argument("--out", required=True, help="folder for throughput.{json,md} and the plots")
    p.add_argument("--shapes", help="comma-separated: keep only these shapes' rows")
    args = p.parse_args(argv)
    reports = []
    for name in args.reports:
        try:
            reports.append(json.loads(Path(name).read_text()))
        except (OSError, ValueError) as e:
            print(f"error: cannot read {name}: {e}", file=sys.stderr)
            return 2
        if not isinstance(reports[-1], dict) or "rows" not in reports[-1]:
            print(f"error: {name} is not an eval.throughput report (no rows)", file=sys.stderr)
            return 2
    merged = merge_reports(reports, args.shapes.split(",") if args.shapes else None)
    if args.shapes and not merged["rows"] and not merged["hf"]:
        print(f"error: no rows of shapes {args.shapes} in these reports", file=sys.stderr)
        return 2
    print(write_report(merged, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
