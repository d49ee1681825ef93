"""The benchmark's report: the printed table, report.json, a self-contained report.html
and its plots (latency.png is the first of them)."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np

from server.telemetry import STAGES

from .stats import CHAIN

# The stages one frame's server time is made of, stacked in the stage plot; "total" spans them.
PARTS = tuple(s for s in STAGES if s != "total")
CHAIN_LABELS = {"client_encode": "client encode", "transit_server_decode": "transit + server decode",
                "server_encode_send": "server encode + send", "transit_client_decode": "transit + client decode"}


def format_table(report: dict) -> str:
    """The table `avatar bench live` prints (and report.html shows first)."""
    lines = [f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; "
             f"server: {'local' if report['server']['local'] else report['server']['url']}"
             + (f"; client VP8 speed {report['client']['vp8_speed']}" if "client" in report else "")
             + ("; camera encoded once, replayed" if report.get("client", {}).get("encode") == "once" else "")]
    rows = [(label, s) for label, s in report["runs"].items()]
    if "scale" in report:
        rows = [(f"scale {s['sessions']}" + (" ok" if s["meets_target"] else ""), s) for s in report["scale"]["steps"]]
    width = max([22] + [len(label) + 2 for label, _ in rows])  # labels whole: "vp8-speed=1" is not "=10"
    head = f"{'run':<{width}}{'sess':>5}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}{'fps/s':>8}{'matched':>9}{'jitter':>8}"
    if rows:  # (--voice has none: no camera frame is shown, so there is no glass-to-glass)
        lines.append(head + "   (glass-to-glass ms)")
    lines += [_row(label, s, width) for label, s in rows]
    return "\n".join(lines + _notes(report))


def _row(label: str, s: dict, width: int) -> str:
    g = s["glass_to_glass_ms"]
    fmt = lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8}"  # noqa: E731
    return (f"{label:<{width}}{s['sessions']:>5}{fmt(g['p50'])}{fmt(g['p95'])}{fmt(g['p99'])}"
            f"{fmt(g['max'])}{s['fps_per_session']:8.1f}{100 * s['matched_ratio']:8.1f}%"
            f"{fmt(s['jitter_ms'])}")


def _notes(report: dict) -> list[str]:
    """The lines under the table: server stages, B/A, the scale verdict, drift."""
    lines = []
    for label, s in report["runs"].items():  # one line per configuration: where B's time goes
        if s["server_stages_p50_ms"]:
            lines.append(f"server stages p50 ms{f' ({label})' if len(report['runs']) > 1 else ''}: "
                         + ", ".join(f"{k} {v:.1f}" for k, v in s["server_stages_p50_ms"].items()))
    for label, s in report["runs"].items():
        lines += _chain_lines(label if len(report["runs"]) > 1 else "", s)
    if "compare" in report:
        c = report["compare"]
        lines.append(f"B/A ({c['B']} over {c['A']}): " + ", ".join(f"{k} {v}" for k, v in c["ratios_B_over_A"].items()))
    if "scale" in report:
        lines.append(f"largest session count meeting p95 <= {report['scale']['target']['p95_ms']} ms at "
                     f">= {report['scale']['target']['fps']} fps: {report['scale']['max_sessions_meeting_target']}")
        lines += _scale_cpu_line(report)
    if report.get("avsync"):
        lines.append(_avsync_line(report["avsync"]))
    if report.get("voice"):
        lines += _voice_lines(report["voice"])
    if report.get("drift"):
        d = report["drift"]
        windows = [v for v in d.get("window_p95_ms") or [] if v is not None]
        spread = (f"; every {d['window_s']:.0f} s: {min(windows):.1f}..{max(windows):.1f} ms"
                  if len(windows) > 2 else "")
        trend = f"; a line through them {100 * d['trend']:+.1f}%" if d.get("trend") is not None else ""
        lines.append(f"drift: p95 first {d['window_s']:.0f} s {d['first_p95_ms']} ms, last {d['last_p95_ms']} ms "
                     f"({100 * d['change']:+.1f}%){spread}{trend}")
    memory = [mb for _, mb in report.get("server_memory_mb") or [] if mb is not None]
    if len(memory) > 1:  # a session process that leaks shows here too
        lines.append(f"server memory, its own and its session processes' (PSS): {memory[0]:.0f} MB at the start, "
                     f"{memory[-1]:.0f} MB at the end, {max(memory):.0f} MB at most")
    return lines


def _avsync_line(a: dict) -> str:
    if not a["windows"]:
        return ("A/V offset at a viewer: no measurable window (the avatar's mouth did not move "
                f"enough, or nothing arrived: {a['viewer_video_frames']} frames, {a['viewer_audio_frames']} audio)")
    o = a["offset_ms"]
    drift = "" if a["drift_ms_per_min"] is None else f", drift {a['drift_ms_per_min']:+.1f} ms/min"
    return (f"A/V offset at a viewer (+: video late), {a['windows']} windows of 10 s: p50 {o['p50']:+.1f} ms, "
            f"p95 {o['p95']:+.1f}, range {o['min']:+.1f}..{o['max']:+.1f}{drift}; "
            f"within +-{a['target_ms']:.0f} ms: {'yes' if a['within_target'] else 'no'}")


def _voice_lines(v: dict) -> list[str]:
    """--voice: the viewer's A/V offset and the delay from the sound leaving to the mouth there."""
    if not v["av_offset"]["windows"] and not v["voice_to_mouth"]["windows"]:
        return [f"voice drives the face: no measurable window ({v['viewer_video_frames']} frames, "
                f"{v['viewer_audio_frames']} audio frames at the viewer)"]
    lines = []
    for key, what in (("av_offset", "A/V offset at the viewer (+: video late)"),
                      ("voice_to_mouth", "from the sound leaving the presenter to the mouth at the viewer")):
        f = v[key]
        if f["windows"]:
            o = f["offset_ms"]
            lines.append(f"voice drives the face: {what}, {f['windows']} windows of 10 s: p50 {o['p50']:+.1f} ms, "
                         f"p95 {o['p95']:+.1f} (goal within {f['target_ms']:.0f} ms: "
                         f"{'met' if f['abs_p95_ms'] <= f['target_ms'] else 'not met'})")
    if v.get("server_cpu_percent") is not None:
        lines.append(f"voice drives the face: server {v['server_cpu_percent']:.0f}% of a core")
    return lines


def _scale_cpu_line(report: dict) -> list[str]:
    """The CPU each --scale step used: a local server's and the bench clients', all sessions
    together, against the cores there are. A failing step far below them is waiting on
    something other than CPU (locks, hand-overs), not short of cores."""
    steps = report["scale"]["steps"]
    keys = ("server_cpu_percent_per_session", "client_cpu_percent_per_session")
    if not all(s.get(k) is not None for s in steps for k in keys):
        return []
    parts = []
    for s in steps:
        n = s["sessions"]
        busy = (s.get("machine_cpu_percent") or {}).get("busy")
        parts.append(f"{n} session{'s' * (n > 1)} {n * sum(s[k] for k in keys):.0f}"
                     + (f" (machine {busy:.0f})" if busy is not None else ""))
    return [f"CPU each step used, server and bench clients together, % of a core: {', '.join(parts)} "
            f"(the machine has {100 * report['machine']['cores']}; 'machine': everything on it was busy)"]


def _chain_lines(label: str, s: dict) -> list[str]:
    """Where one configuration's glass-to-glass time goes, and the CPU a session costs the
    server (when it is local) and the bench client."""
    lines = []
    chain = s.get("chain_p50_ms")
    if chain:
        parts = ", ".join(f"{CHAIN_LABELS.get(k, k)} {chain[k]:.1f}" for k in CHAIN)
        lines.append(f"where the time goes, p50 ms{f' ({label})' if label else ''}: {parts}; "
                     f"sum {chain['sum']:.1f} vs glass-to-glass p50 {s['glass_to_glass_ms']['p50']:.1f}")
        tail = s.get("chain_p95_ms") or {}
        lines.append("  p95 of each part: " + ", ".join(f"{CHAIN_LABELS.get(k, k)} {tail[k]:.1f}" for k in CHAIN))
    client, server = s.get("client_cpu_percent_per_session"), s.get("server_cpu_percent_per_session")
    if server is not None and client is not None:
        lines.append(f"CPU per session, % of a core: server {server:.0f}, bench client {client:.0f} "
                     f"(together {server + client:.0f}: they share this machine's cores)")
    elif client is not None:
        lines.append(f"bench client CPU per session: {client:.0f}% of a core")
    lines += _placement_lines(s.get("placement") or {})
    machine = s.get("machine_cpu_percent") or {}
    if machine.get("busy") is not None:
        lines.append(f"the whole machine meanwhile, % of a core: busy {machine['busy']:.0f}, "
                     f"steal {machine['steal']:.0f} (its hypervisor's other guests)")
    return lines


def _placement_lines(p: dict) -> list[str]:
    """Only where a cluster spread the sessions, or redirected one."""
    landed, redirected = p.get("landed") or {}, (p.get("connect_ms_redirected") or {}).get("n")
    if len(landed) < 2 and not redirected:
        return []
    where = ", ".join(f"{url} x{n}" for url, n in sorted(landed.items()))
    ms = lambda d: "-" if not d or d.get("p50") is None else f"p50 {d['p50']:.0f} / p95 {d['p95']:.0f} ms"  # noqa: E731
    return [f"placement: {where}; session setup direct {ms(p.get('connect_ms_direct'))}, "
            f"after a redirect {ms(p.get('connect_ms_redirected'))}"]


def write_reports(report: dict, out: Path) -> None:
    """report.json, report.html (plots inlined, so it travels as one file) and latency.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plots = make_plots(report)
    (out / "latency.png").write_bytes(plots["latency"])
    imgs = "\n".join(f'<h2>{name}</h2><img alt="{name}" src="data:image/png;base64,'
                     f'{base64.b64encode(png).decode()}">' for name, png in plots.items())
    html = (f"<!doctype html><meta charset=utf-8><title>avatar bench live</title>"
            f"<style>body{{font:14px sans-serif;margin:2em}}pre{{background:#f4f4f4;padding:1em}}"
            f"img{{max-width:100%}}</style><h1>avatar bench live</h1>"
            f"<pre>{_escape(format_table(report))}</pre>{imgs}"
            f"<h2>raw</h2><pre>{_escape(json.dumps({k: v for k, v in report.items() if k != 'sessions_detail'}, indent=2))}</pre>")
    (out / "report.html").write_text(html)


def make_plots(report: dict) -> dict[str, bytes]:
    """PNGs by name: latency over time, histogram, server stages, fps over time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detail = report.get("sessions_detail", {})
    plots = {}
    for name, height, draw in (("latency", 4, _latency_plot), ("histogram", 3.5, _histogram_plot),
                               ("chain", 3.5, _chain_plot), ("stages", 3.5, _stages_plot),
                               ("fps", 3.5, _fps_plot)):
        fig, ax = plt.subplots(figsize=(9, height))
        draw(ax, report, detail)
        plots[name] = _png(fig)
    if (report.get("avsync") or {}).get("series"):
        fig, ax = plt.subplots(figsize=(9, 3))
        t, ms = np.array(report["avsync"]["series"]).T
        ax.plot(t, ms, "o-")
        ax.axhspan(-report["avsync"]["target_ms"], report["avsync"]["target_ms"], color="#dfd", zorder=0)
        ax.set(xlabel="window start (s)", ylabel="offset (ms, + video late)", title="A/V offset at a viewer")
        plots["avsync"] = _png(fig)
    return plots


def _latency_plot(ax, report: dict, detail: dict) -> None:
    for label, sessions in detail.items():
        for s in sessions:
            if s["latency_ms"]:
                t, ms = np.array(s["latency_ms"]).T
                ax.plot(t, ms, ".", ms=2, label=f"{label} #{s['session']}")
    ax.set(xlabel="time since warm-up (s)", ylabel="glass-to-glass (ms)", title="latency over time")
    if detail:
        ax.legend(fontsize=7, markerscale=4)


def _histogram_plot(ax, report: dict, detail: dict) -> None:
    for label, sessions in detail.items():
        ms = [v for s in sessions for _, v in s["latency_ms"]]
        if ms:
            ax.hist(ms, bins=50, alpha=0.6, label=label)
    ax.set(xlabel="glass-to-glass (ms)", ylabel="frames", title="latency histogram")


def _chain_plot(ax, report: dict, detail: dict) -> None:
    """Each configuration's glass-to-glass median, stacked by where the time goes: transport
    (encode, transit, decode) against the server's queue and compute."""
    labels = [label for label, s in report["runs"].items() if s.get("chain_p50_ms")]
    left = np.zeros(len(labels))
    colors = {"client_encode": "#9ecae1", "transit_server_decode": "#c6dbef", "queue": "#fdd0a2",
              "convert": "#fdae6b", "landmarks": "#fd8d3c", "retarget": "#f16913", "render": "#d94801",
              "server_encode_send": "#6baed6", "transit_client_decode": "#deebf7"}
    for part in CHAIN:
        vals = np.array([report["runs"][l]["chain_p50_ms"][part] for l in labels])
        ax.barh(labels, vals, left=left, label=CHAIN_LABELS.get(part, part), color=colors.get(part),
                edgecolor="white")
        left += vals
    for i, l in enumerate(labels):
        ax.plot([report["runs"][l]["glass_to_glass_ms"]["p50"]] * 2, [i - 0.4, i + 0.4], "k-", lw=2)
    ax.set(xlabel="ms (p50 per part; black line: glass-to-glass p50)",
           title="where the time goes (blue: transport, orange: server compute)")
    if labels:
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.25))


def _stages_plot(ax, report: dict, detail: dict) -> None:
    """Each configuration's server time, stacked by stage."""
    labels = list(report["runs"])
    bottom = np.zeros(len(labels))
    for stage in PARTS:
        vals = np.array([report["runs"][l]["server_stages_p50_ms"].get(stage, 0.0) for l in labels])
        ax.bar(labels, vals, bottom=bottom, label=stage)
        bottom += vals
    ax.set(ylabel="ms (p50)", title="server stages")
    ax.legend(fontsize=8)


def _fps_plot(ax, report: dict, detail: dict) -> None:
    """Matched frames per second of sending, per session."""
    for label, sessions in detail.items():
        for s in sessions:
            if s["latency_ms"]:
                t = np.array(s["latency_ms"])[:, 0]
                counts, edges = np.histogram(t, bins=np.arange(0, t.max() + 1.0, 1.0))
                ax.plot(edges[:-1], counts, label=f"{label} #{s['session']}")
    ax.set(xlabel="time (s)", ylabel="fps delivered", title="fps over time")


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
