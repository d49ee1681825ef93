"""`avatar bench live` measures a real server end to end."""
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from engines.identity import Consent, IdentityStore
from server.bench.client import ClipTrack, ReplayTrack, encode_clip, nearest
from server.bench.stats import CHAIN, frame_chain


def bench(*args, home, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "AVATAR_HOME"}  # --home alone says where
    return subprocess.run([sys.executable, "-m", "server.cli", "--home", str(home), "bench", "live", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_short_run_against_a_local_server(tmp_path, demo):
    # An identity only this --home has: the local server must serve that store.
    guest = IdentityStore(tmp_path / "home" / "identities")
    guest.create(demo.reference, "guest", Consent(**demo.manifest["consent"]), "Guest", source="demo")
    out = tmp_path / "report"
    result = bench("--identity", "guest", "--duration", "6", "--warmup", "2", "--out", str(out),
                   home=tmp_path / "home")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "glass-to-glass" in result.stdout
    report = json.loads((out / "report.json").read_text())
    run = report["runs"]["identity=guest"]
    g = run["glass_to_glass_ms"]
    assert 0 < g["p50"] <= g["p95"] <= g["p99"] <= g["max"] < 5000
    assert run["sent"] > 100 and run["matched_ratio"] >= 0.9, run
    assert run["fps_per_session"] > 10
    assert run["server_stages_p50_ms"]["landmarks"] > 0
    # Where the time goes: every part measured, and per frame they add up to glass-to-glass
    # (to the server's 0.1 ms rounding); the medians of the parts roughly to its median
    # (medians need not add up: under load the tails of different parts fall on other frames).
    chain = run["chain_p50_ms"]
    assert chain["frames"] >= 0.8 * run["matched"], chain
    assert all(chain[part] >= 0 for part in CHAIN) and chain["landmarks"] > 0, chain
    assert chain["max_frame_residual"] <= 1.0, chain
    assert abs(chain["sum"] - g["p50"]) <= max(10.0, 0.3 * g["p50"]), (chain, g)
    assert 0 < run["client_cpu_percent_per_session"] <= 200
    assert 0 < run["server_cpu_percent_per_session"] <= 200  # the local server's own process
    assert "where the time goes" in result.stdout and "CPU per session, % of a core: server" in result.stdout
    assert report["machine"]["cores"] >= 1
    memory = [mb for _, mb in report["server_memory_mb"]]
    # Read at the start and at the end (runner.MEMORY_EVERY_S apart at most): the server and its session's process.
    assert len(memory) >= 2 and all(mb > 100 for mb in memory)
    assert "server memory, its own and its session processes' (PSS)" in result.stdout
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_compare_interleaves_rounds_on_a_one_session_server(tmp_path, store):
    # The local server admits one session: each round must wait out the previous one's
    # cleanup ('busy'), and fps must be per measured second of each round, not of the run.
    # B's camera is replayed from one encode (client-encode=once): the server sees it at 30 fps too.
    out = tmp_path / "cmp"
    result = bench("--compare", "identity=demo", "identity=demo,client-encode=once", "--rounds", "2",
                   "--duration", "4", "--warmup", "1", "--out", str(out), home=store.root.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["runs"]) == {"identity=demo", "identity=demo,client-encode=once"}
    for run in report["runs"].values():
        assert run["sessions"] == 1 and run["rounds"] == 2
        assert 20 <= run["fps_per_session"] <= 31, run  # the clip plays at 30 fps
    assert report["compare"]["ratios_B_over_A"]["fps"] > 0.7
    assert "B/A" in result.stdout and "server stages p50 ms (identity=demo,client-encode=once):" in result.stdout
    a, b = (report["runs"][k]["client_cpu_percent_per_session"] for k in ("identity=demo", "identity=demo,client-encode=once"))
    assert b < a, (a, b)  # the replaying client spends no CPU encoding


def test_server_down_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = bench("--url", f"http://127.0.0.1:{port}/", "--duration", "1", home=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "no avatar server answers" in result.stderr


def test_wrong_url_is_a_clear_error(tmp_path):
    result = bench("--url", "ftp://example.invalid/", "--duration", "1", home=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "error:" in result.stderr


@pytest.mark.parametrize("encode", ["live", "once"])
async def test_a_peer_receives_the_pts_the_client_sent(encode):
    # The bench matches the server's in_pts to the pts its ClipTrack sent, with no pinning
    # of aiortc's random RTP timestamp origin: an aiortc receiver takes the first timestamp
    # it decodes away again. If aiortc changes that, this fails here, not as a bench that
    # quietly pairs each avatar frame with the wrong camera frame. Each frame's own grey
    # level says which one it really is. Likewise for a clip encoded once and replayed
    # (--client-encode once): aiortc packetizes its frames, which decode to the right picture.
    frames = [np.full((64, 64, 3), 8 * i, np.uint8) for i in range(30)]
    if encode == "once":
        clip = encode_clip(frames)
        assert [f[0] & 1 for f in clip.frames] == [0] + [1] * 29  # VP8: a keyframe, then deltas
        track = ReplayTrack(clip)
    else:
        track = ClipTrack(frames)
    sender, receiver = (RTCPeerConnection(RTCConfiguration(iceServers=[])) for _ in range(2))
    sender.addTrack(track)
    got, tasks = [], []

    async def collect(remote):
        try:
            while True:
                frame = await remote.recv()
                got.append((frame.pts, float(frame.to_ndarray(format="rgb24").mean())))
        except MediaStreamError:
            pass

    receiver.on("track", lambda remote: tasks.append(asyncio.ensure_future(collect(remote))))
    try:
        await sender.setLocalDescription(await sender.createOffer())
        await receiver.setRemoteDescription(sender.localDescription)
        await receiver.setLocalDescription(await receiver.createAnswer())
        await sender.setRemoteDescription(receiver.localDescription)
        for _ in range(200):
            if track.readyState == "ended" and len(got) >= len(frames) - 1:
                break
            await asyncio.sleep(0.05)
    finally:
        for t in tasks:
            t.cancel()
        await sender.close()
        await receiver.close()
    assert len(got) >= 20, f"only {len(got)} of {len(frames)} frames arrived"
    pts = nearest(list(track.sent), [p for p, _ in got])
    assert None not in pts, f"received pts {[p for p, _ in got]} are not the sent ones"
    shown = [track.sent[p] for p in pts]
    assert all(abs(grey - 8 * i) < 4 for i, (_, grey) in zip(shown, got)), list(zip(shown, got))
    if encode == "once":  # each frame left after the time its encode took
        assert all(track.left_at[p] - track.sent_at[p] >= clip.seconds[track.sent[p]]
                   for p in track.left_at), "a replayed frame left before its encode time"


def test_frame_chain_parts_add_up_to_glass_to_glass():
    server = {"recv": 10.040, "done": 10.060, "sent": 10.064,
              "stages": {"queue": 2.0, "convert": 1.0, "landmarks": 9.0, "retarget": 1.0, "render": 7.0}}
    chain = frame_chain(sent=10.000, left=10.005, server=server, received=10.100)
    assert set(chain) == set(CHAIN)
    assert chain["client_encode"] == pytest.approx(5.0) and chain["server_encode_send"] == pytest.approx(4.0)
    assert chain["transit_server_decode"] == pytest.approx(35.0)
    assert chain["transit_client_decode"] == pytest.approx(36.0)
    assert sum(chain.values()) == pytest.approx(100.0)  # = received - sent
    # A frame the server has not reported as sent yet has no chain (rather than a wrong one).
    assert frame_chain(10.0, 10.005, {k: v for k, v in server.items() if k != "sent"}, 10.1) is None


def test_compare_configurations_name_identity_and_marker_completion(tmp_path):
    from server.bench.runner import RunConfig

    cfg = RunConfig.parse("identity=scan,marker=off")
    assert (cfg.identity, cfg.marker) == ("scan", False) and RunConfig.parse("marker=on").marker
    assert RunConfig.parse("opencv-threads=1,marker=on").opencv_threads == 1
    assert RunConfig.parse("compute=thread").server_flags() == ("--compute", "thread")
    from argparse import Namespace
    from server.bench.command import run_configs
    a_a = run_configs(Namespace(compare=["identity=demo", "identity=demo"], identity="demo", client_encode="once",
                                scale=None))
    assert [c.label for c in a_a] == ["identity=demo", "identity=demo (B)"]  # an A/A run keeps both
    assert all(c.client_encode == "once" for c in a_a)  # --client-encode is every configuration's default
    # Unsaid, the camera is encoded live, but replayed for --scale (the server's own capacity).
    unsaid = Namespace(compare=None, identity="demo", client_encode=None, scale=None)
    assert [c.client_encode for c in run_configs(unsaid)] == ["live"]
    assert [c.client_encode for c in run_configs(Namespace(**{**vars(unsaid), "scale": 3}))] == ["once"]
    assert [c.client_encode for c in run_configs(Namespace(**{**vars(unsaid), "scale": 3, "client_encode": "live"}))] == ["live"]
    once = RunConfig.parse("client-encode=once")  # the bench client's own setting: no server flag
    assert once.client_encode == "once" and once.server_flags() == ()
    for bad in ("marker=maybe", "speed=2", "identity", "opencv-threads=x", "opencv-threads=-1", "opencv-threads=99",
                "compute=gpu", "client-encode=twice"):
        with pytest.raises(ValueError):
            RunConfig.parse(bad)
    # marker=off is also a server setting: it needs the local server the bench starts.
    result = bench("--url", "http://127.0.0.1:9/", "--compare", "marker=off", "marker=on", home=tmp_path,
                   timeout=60)
    assert result.returncode == 2 and "marker=off needs the local server" in result.stderr


def test_drift_reports_every_windows_p95_so_a_burst_is_not_a_trend():
    from server.bench.report import _notes
    from server.bench.stats import SessionResult, drift

    burst = lambda s: 240 <= s < 300  # noqa: E731 - the fifth minute is slow
    result = SessionResult("a", 0, latencies_ms=[(i / 30, 60.0 if burst(i / 30) else 20.0) for i in range(30 * 600)])
    d = drift([result], 600)
    assert d["window_s"] == 60 and d["change"] == 0
    assert d["window_p95_ms"] == [20.0] * 4 + [60.0] + [20.0] * 5
    assert any("every 60 s: 20.0..60.0 ms" in line for line in _notes({"runs": {}, "drift": d}))
    assert abs(d["trend"]) < 0.15  # one slow minute in the middle barely tilts the line


def test_drift_trend_sees_steady_growth_that_two_noisy_windows_miss():
    from server.bench.report import _notes
    from server.bench.stats import SessionResult, drift

    # p95 grows 6 ms per 4-s window for four windows; the fifth happens to be quick.
    per_window = [30.0, 36.0, 42.0, 48.0, 32.0]
    lat = [(t, per_window[int(t // 4)]) for t in np.arange(0, 20, 1 / 30)]
    d = drift([SessionResult("a", 0, latencies_ms=lat)], 20)
    assert d["change"] < 0.1 and d["trend"] > 0.15, d  # first to last +6.7%; the line +18.6%
    assert any(f"a line through them {100 * d['trend']:+.1f}%" in line for line in _notes({"runs": {}, "drift": d}))
    ends = [(t, ms) for t, ms in lat if t < 4 or t >= 16]
    assert drift([SessionResult("a", 0, latencies_ms=ends)], 20)["trend"] is None  # two windows: no line


def run_summary(sessions=1, p95=40.0, **extra) -> dict:
    """A measured run's summary as format_table reads it."""
    return {"sessions": sessions, "glass_to_glass_ms": {"p50": 30.0, "p95": p95, "p99": p95 + 10, "max": p95 + 20},
            "fps_per_session": 30.0, "matched_ratio": 1.0, "jitter_ms": 5.0, "server_stages_p50_ms": {}, **extra}


def table_report(runs: dict, **extra) -> dict:
    """A report of a local server on a 2-core machine, as format_table reads it."""
    return {"machine": {"cpu": "x", "cores": 2}, "server": {"local": True}, "client": {"vp8_speed": 6},
            "runs": runs, **extra}


def test_table_keeps_long_configuration_labels_whole():
    from server.bench.report import format_table

    labels = ("identity=a,vp8-speed=6", "identity=a,vp8-speed=10")
    report = table_report({label: run_summary() for label in labels})
    rows = format_table(report).splitlines()
    assert "client VP8 speed 6" in rows[0]
    assert [r.split()[0] for r in rows[2:4]] == list(labels)  # "...=10" was cut to "...=1"


def test_server_cpu_per_session_is_read_from_the_servers_process():
    from server.bench.runner import cpu_seconds, server_cpu_percent

    pid = os.getpid()  # this process stands in for a local server
    start, since = cpu_seconds(pid), (time.process_time(), time.time())
    while time.time() - since[1] < 0.3:
        pass  # one busy core
    assert 70 <= server_cpu_percent(pid, start, since, sessions=1) <= 130
    assert 35 <= server_cpu_percent(pid, start, since, sessions=2) <= 65
    assert server_cpu_percent(None, start, since, sessions=1) is None  # --url: no process to read
    assert cpu_seconds(2 ** 22 + 12345) is None  # no such process


def test_server_cpu_counts_its_child_processes():
    """Sessions compute in processes the server forked (through the fork server): their CPU
    is the server's too, while they run and after they ended."""
    from server.bench.runner import cpu_seconds

    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(5)"
    child = subprocess.Popen([sys.executable, "-c", busy])
    try:
        start = cpu_seconds(os.getpid())
        time.sleep(1.0)  # this process idles; its child burns 0.4 s (after its start-up)
        assert cpu_seconds(os.getpid()) - start >= 0.3
    finally:
        child.kill()
        child.wait()


def test_server_memory_counts_its_child_processes_once_each():
    """A session process that holds memory shows in the server's figure; the pages a child
    shares with its parent do not count twice."""
    from server.bench.runner import memory_mb

    hold = "import sys, time\nblock = bytearray(200 << 20)\nprint(flush=True)\ntime.sleep(30)"
    before = memory_mb(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # its 200 MB are written (zeroed) by now
        grown = memory_mb(os.getpid()) - before
        assert 190 <= grown <= 260, grown  # the block, and a Python interpreter's own pages
    finally:
        child.kill()
        child.wait()


def test_machine_cpu_is_what_the_whole_machine_did_meanwhile():
    from server.bench.runner import machine_cpu_percent, machine_cpu_ticks

    start, t = machine_cpu_ticks(), time.time()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 0.5: pass"])
    while time.time() - t < 0.5:
        pass  # this process and another: two busy cores' worth, whatever the cores
    child.wait()
    used = machine_cpu_percent(start)
    assert min(200, 100 * os.cpu_count()) * 0.8 <= used["busy"] <= 100 * os.cpu_count() + 1, used
    assert 0 <= used["steal"] <= 100 * os.cpu_count()
    assert machine_cpu_percent(None) is None  # no reading at the start: none at the end


def test_table_shows_server_and_client_cpu_per_session():
    from server.bench.report import format_table

    run = run_summary(client_cpu_percent_per_session=20.0, server_cpu_percent_per_session=47.0)
    report = table_report({"identity=demo": run})
    assert "server 47, bench client 20 (together 67" in format_table(report)
    report["runs"]["identity=demo"] = {**run, "server_cpu_percent_per_session": None}  # a remote server
    assert "bench client CPU per session: 20% of a core" in format_table(report)
    assert "the whole machine" not in format_table(report)
    report["runs"]["identity=demo"]["machine_cpu_percent"] = {"busy": 150.0, "steal": 3.0}
    assert "the whole machine meanwhile, % of a core: busy 150, steal 3" in format_table(report)


def test_scale_verdict_says_what_cpu_each_step_used():
    from server.bench.report import format_table

    def step(n, p95, server, client):
        return run_summary(n, p95, meets_target=p95 <= 80, server_cpu_percent_per_session=server,
                           client_cpu_percent_per_session=client)
    steps = [step(1, 30.0, 47.0, 20.0), step(2, 50.0, 46.0, 19.0), step(3, 150.0, 45.0, 20.0)]
    steps[2]["machine_cpu_percent"] = {"busy": 198.0, "steal": 0.0}
    report = table_report({"identity=demo": steps[0]},
                          scale={"steps": steps, "target": {"p95_ms": 80.0, "fps": 25.0}, "max_sessions_meeting_target": 2})
    assert ("CPU each step used, server and bench clients together, % of a core: 1 session 67, 2 sessions 130, "
            "3 sessions 195 (machine 198) (the machine has 200;") in format_table(report)
    steps[2]["server_cpu_percent_per_session"] = None  # a remote server: no sum to show
    assert "CPU each step used" not in format_table(report)


@pytest.mark.slow
def test_voice_run_reports_the_offset_the_delay_and_the_cpu(tmp_path):
    """--voice (issue #36): the camera off, eSpeak NG sentences as the microphone."""
    import ctypes.util

    if ctypes.util.find_library("espeak-ng") is None:
        pytest.skip("eSpeak NG is not installed (apt-get install -y espeak-ng libespeak-ng1)")
    out = tmp_path / "report"
    # 16 s: a 10-s window must fit in what both sides recorded, also when a loaded machine starts late
    result = bench("--voice", "--duration", "16", "--warmup", "3", "--out", str(out), home=tmp_path / "home")
    assert result.returncode == 0, result.stderr[-3000:]
    voice = json.loads((out / "report.json").read_text())["voice"]
    print(result.stdout)
    delay, offset = voice["voice_to_mouth"], voice["av_offset"]
    assert delay["windows"] >= 1 and 100 < delay["offset_ms"]["p50"] < 600, delay  # ~the recognizer's lookahead
    assert offset["windows"] >= 1 and abs(offset["offset_ms"]["p50"]) < 120, offset  # the room holds the voice
    assert 0 < voice["server_cpu_percent"] < 200
    assert "from the sound leaving the presenter to the mouth at the viewer" in result.stdout
    assert "A/V offset at the viewer" in result.stdout


def test_voice_is_one_presenter_and_one_viewer(tmp_path):
    result = bench("--voice", "--sessions", "2", home=tmp_path / "home", timeout=60)
    assert result.returncode == 2 and "--voice measures one presenter and one viewer" in result.stderr
