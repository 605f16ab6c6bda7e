"""PNG charts of a profile (``profile.Profile.to_dict()``) and of a budget sweep (matplotlib, Agg).

memory.png          RSS over time stacked by owner (each owner held from one snapshot to the next;
                    "other" is the measured RSS minus the owners), phases shaded, the RSS line on top
cache_rows.png      rows each layer's window cache holds after each token (a heat map)
bytes_per_token.png SSD bytes read by each forward pass (0 = the prefill) and the window hit rate
sweep.png           decode tok/s, bytes per token and peak RSS against the budget
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from flashinfer_local.measure.profile import OWNERS, PHASES

MIB = 2 ** 20
COLORS = {"runtime": "#b0b0b0", "dense": "#4c72b0", "ffn_dram": "#8172b3", "window": "#55a868",
          "buffers": "#ccb974", "kv_cache": "#c44e52", "selector": "#937860", "draft": "#da8bc3",
          "other": "#e8e8e8"}
LABELS = {"runtime": "runtime baseline", "dense": "dense (mapped)", "ffn_dram": "FFN in DRAM",
          "window": "window cache", "buffers": "buffers", "kv_cache": "KV cache",
          "selector": "selector", "draft": "speculative draft", "other": "other (RSS - owners)"}
PHASE_COLORS = {"load": "#fff3d6", "prefill": "#e3f0ff", "decode": "#eaf7e6"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _title(d: dict) -> str:
    f = d["facts"]
    b = f.get("dram_budget_bytes")
    return (f"{Path(d['model']).name}: offload {f.get('offload')}, budget "
            f"{f'{b / MIB:.0f} MiB' if b else 'unlimited'}")


def _owner_series(d: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per RSS sample: each owner's bytes from the latest snapshot at or before it; before the first
    snapshot (loading) only the runtime baseline is known. ``other`` fills up to the RSS (>= 0)."""
    t = np.asarray(d["samples"]["t"])
    rss = np.asarray(d["samples"]["rss"], dtype=np.float64)
    snaps = d["snapshots"]
    st = np.asarray([s["t"] for s in snaps])
    k = np.searchsorted(st, t, side="right") - 1                          # [samples] snapshot index
    runtime = d["facts"].get("runtime_baseline_bytes", 0)
    series = {}
    for o in OWNERS:
        vals = np.asarray([s["owners"][o] for s in snaps] or [0], dtype=np.float64)
        series[o] = np.where(k >= 0, vals[np.maximum(k, 0)], 0.0)
    series["runtime"] = np.where(k >= 0, series["runtime"], np.minimum(rss, runtime))
    series["other"] = np.maximum(rss - sum(series.values()), 0.0)
    return t, series


def memory_chart(d: dict, path: Path) -> None:
    plt = _plt()
    t, series = _owner_series(d)
    rss = np.asarray(d["samples"]["rss"]) / MIB
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=90)
    span = max(t[-1] - t[0], 1e-9)
    for p in PHASES:
        if p in d["phases"]:
            a, b = d["phases"][p]
            ax.axvspan(a, b, color=PHASE_COLORS[p], zorder=0, label=f"{p} phase")
            if b - a > 0.08 * span:                       # narrow phases: named in the legend only
                ax.text((a + b) / 2, 1.0, p, transform=ax.get_xaxis_transform(), ha="center",
                        va="bottom", fontsize=9)
    shown = [o for o in (*OWNERS, "other") if series[o].any()]
    ax.stackplot(t, *[series[o] / MIB for o in shown], labels=[LABELS[o] for o in shown],
                 colors=[COLORS[o] for o in shown], alpha=0.9, zorder=1)
    ax.plot(t, rss, color="black", lw=1, label="RSS (measured)", zorder=2)
    b = d["facts"].get("dram_budget_bytes")
    if b:
        base = d["facts"]["runtime_baseline_bytes"]
        ax.axhline((base + b) / MIB, color="#c44e52", ls="--", lw=1, label="runtime + budget", zorder=2)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("MiB")
    ax.set_xlim(t[0], t[-1])
    ax.set_ylim(0, None)
    ax.set_title(_title(d), pad=16, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    _save(plt, fig, path)


def cache_rows_chart(d: dict, path: Path) -> None:
    plt = _plt()
    snaps = [s for s in d["snapshots"] if s["token"] is not None]
    rows = np.asarray([s["cache_rows"] for s in snaps], dtype=np.float64)    # [tokens, layers]
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=90)
    cap = d["facts"].get("cache_rows_capacity", 0)
    if rows.size == 0 or rows.shape[1] == 0:
        ax.text(0.5, 0.5, f"no window cache (offload {d['facts'].get('offload')})", ha="center",
                va="center", fontsize=12, transform=ax.transAxes)
        ax.set_axis_off()
    else:
        im = ax.imshow(rows.T, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                       vmin=0, vmax=max(cap, 1), extent=(-0.5, rows.shape[0] - 0.5, -0.5, rows.shape[1] - 0.5))
        fig.colorbar(im, ax=ax, label=f"rows held (capacity {cap}, d_ff {d['facts']['d_ff']})")
        ax.set_xlabel("token (0 = prefill)")
        ax.set_ylabel("layer")
    ax.set_title(f"window cache rows per layer -- {_title(d)}", fontsize=10)
    _save(plt, fig, path)


def bytes_per_token_chart(d: dict, path: Path) -> None:
    plt = _plt()
    toks = d["tokens"]
    i = np.asarray([x["index"] for x in toks])
    read = np.asarray([x["flash_bytes_read"] for x in toks], dtype=np.float64) / MIB
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=90)
    if len(i):
        ax.bar(i[1:], read[1:], color="#4c72b0", width=0.8, label="decode")
        ax.bar(i[:1], read[:1], color="#dd8452", width=0.8, label="prefill (whole prompt)")
        look = np.asarray([x["lookups"] for x in toks], dtype=np.float64)
        if look.any():
            hit = np.asarray([x["hits"] for x in toks]) / np.maximum(look, 1)
            ax2 = ax.twinx()
            ax2.plot(i, 100 * hit, color="#55a868", marker=".", lw=1, label="window hit rate")
            ax2.set_ylabel("window cache hit rate (%)")
            ax2.set_ylim(0, 105)
            ax2.legend(loc="upper right", fontsize=8)
    if not read.any():
        ax.text(0.5, 0.5, f"no SSD reads (offload {d['facts'].get('offload')}: records in DRAM)",
                ha="center", va="center", transform=ax.transAxes, fontsize=11)
    ax.set_xlabel("token (0 = prefill)")
    ax.set_ylabel("SSD bytes read (MiB)")
    ax.set_ylim(0, None)
    ax.legend(loc="upper center", fontsize=8)
    ax.set_title(f"bytes read per token -- {_title(d)}", fontsize=10)
    _save(plt, fig, path)


def write_profile_charts(d: dict, out: Path) -> list[Path]:
    """memory.png, cache_rows.png, bytes_per_token.png into ``out``; returns their paths."""
    paths = [out / "memory.png", out / "cache_rows.png", out / "bytes_per_token.png"]
    for chart, p in zip((memory_chart, cache_rows_chart, bytes_per_token_chart), paths):
        chart(d, p)
    return paths


def sweep_chart(sweep: dict, path: Path) -> None:
    """Two panels against the budget: decode tok/s and bytes/token; peak RSS above the runtime."""
    plt = _plt()
    ok = [r for r in sweep["rows"] if r["status"] == "ok"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=90)
    if ok:
        b = np.asarray([r["budget_bytes"] for r in ok]) / MIB
        a1.plot(b, [r["decode_tokens_per_s"] for r in ok], "o-", color="#4c72b0", label="decode tok/s")
        a1.set_ylabel("decode tokens/s", color="#4c72b0")
        a1.set_ylim(0, None)
        tw = a1.twinx()
        tw.plot(b, np.asarray([r["decode_bytes_per_token"] for r in ok]) / MIB, "s--", color="#dd8452",
                label="SSD MiB/token")
        tw.set_ylabel("SSD MiB read per decode token", color="#dd8452")
        tw.set_ylim(0, None)
        if sweep.get("target_tps"):
            a1.axhline(sweep["target_tps"], color="gray", ls=":", lw=1, label="--target-tps")
        h1, l1 = a1.get_legend_handles_labels()
        h2, l2 = tw.get_legend_handles_labels()
        a1.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
        a2.plot(b, np.asarray([r["peak_above_runtime_bytes"] for r in ok]) / MIB, "o-", color="#c44e52",
                label="peak RSS - runtime baseline")
        a2.plot(b, np.asarray([r["peak_rss_bytes"] for r in ok]) / MIB, "^-", color="#8c8c8c",
                label="peak RSS")
        lim = [0, b.max() * 1.05]
        a2.plot(lim, lim, color="black", lw=0.8, ls="--", label="budget (y = x)")
        a2.legend(fontsize=8)
    for r in sweep["rows"]:
        if r["status"] != "ok":
            a1.axvline(r["budget_bytes"] / MIB, color="#c44e52", ls=":", lw=1)
            a1.text(r["budget_bytes"] / MIB, 0.02, " " + r["status"], rotation=90, fontsize=8,
                    transform=a1.get_xaxis_transform(), va="bottom")
    for a in (a1, a2):
        a.set_xlabel("--dram-budget (MiB)")
    a2.set_ylabel("MiB")
    a1.set_title("speed and SSD traffic", fontsize=10)
    a2.set_title("peak memory against the budget", fontsize=10)
    fig.suptitle(f"budget sweep: {Path(sweep['model']).name}", fontsize=11)
    _save(plt, fig, path)


def quality_chart(res: dict, path: Path) -> None:
    """``eval``'s results: perplexity increase and bytes read per token (no cache) against sparsity."""
    plt = _plt()
    rows = sorted(res["rows"], key=lambda r: r["sparsity"])
    s = [r["sparsity"] for r in rows]
    fig, a1 = plt.subplots(figsize=(6.5, 4.2), dpi=90)
    for part, style in (("all", "o-"), ("prose", "^:"), ("code", "v:"), ("corpus", "^:")):
        if part in rows[0]["ppl_increase"]:
            a1.plot(s, [100 * r["ppl_increase"][part] for r in rows], style, label=f"perplexity increase ({part})")
    a1.axhline(1, color="gray", ls="--", lw=0.8)
    a1.axhline(3, color="gray", ls=":", lw=0.8)
    a1.axvline(res["default_sparsity"], color="#55a868", lw=1, label="calibrated default")
    a1.set_xlabel("sparsity (share of neurons skipped per token)")
    a1.set_ylabel("perplexity increase over exact (%)")
    tw = a1.twinx()
    tw.plot(s, [r["bytes_per_token"] / MIB for r in rows], "s--", color="#dd8452", label="MiB read/token")
    tw.axhline(res["all_bytes_per_token"] / MIB, color="#dd8452", lw=0.6, ls=":")
    tw.set_ylabel("MiB read per token with no cache (dotted: all)", color="#dd8452")
    tw.set_ylim(0, None)
    h1, l1 = a1.get_legend_handles_labels()
    h2, l2 = tw.get_legend_handles_labels()
    a1.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    fig.suptitle(f"{res['predictor']} predictor: {Path(res.get('bundle', '')).name}", fontsize=11)
    _save(plt, fig, path)
