"""End to end: a driver clip streamed through a real in-process server over WebRTC."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engines.landmarks import FaceLandmarker, mouth_openness
from helpers import Client, ClipTrack, clip, read_seconds, running_server, wait_for

SECONDS = 6.0


def openness(frames) -> list[float | None]:
    values = []
    with FaceLandmarker(static=False) as lm:
        for rgb in frames:
            pts = lm(rgb)
            values.append(None if pts is None else mouth_openness(pts))
    return values


@pytest.mark.slow
@pytest.mark.parametrize("compute", ["process", "thread"])
async def test_avatar_follows_driver_mouth(tmp_path, monkeypatch, compute):
    driver = read_seconds(clip("drive_wink.mp4"), SECONDS)
    async with running_server(tmp_path, monkeypatch, compute=compute) as srv:
        client = await Client(srv.ws_url).connect()
        session = await client.hello()
        assert session["type"] == "session" and session["identity"] == "demo"
        track = ClipTrack(driver)
        await client.start_media(track)
        await wait_for(lambda: track.readyState == "ended", SECONDS + 15, "the clip to play")
        await asyncio.sleep(0.5)  # the last frames in flight
        stats = list(client.stats)
        received = list(client.received)
        await client.close()

    # Each avatar frame carries its driver frame's pts (RTP rounding: a tick or two).
    sent = np.array(sorted(track.sent))
    pairs = []
    for pts, _, rgb in received:
        k = int(np.argmin(np.abs(sent - pts)))
        if abs(int(sent[k]) - pts) <= 90:
            pairs.append((track.sent[int(sent[k])], rgb))
    assert len(pairs) >= 0.6 * len(driver), f"only {len(pairs)} of {len(driver)} frames came back"

    driver_open = openness(driver[i] for i, _ in pairs)
    avatar_open = openness(rgb for _, rgb in pairs)
    both = [(d, a) for d, a in zip(driver_open, avatar_open) if d is not None and a is not None]
    assert len(both) >= 0.8 * len(pairs), "faces missing in driver or avatar frames"
    d, a = np.array(both).T
    r = float(np.corrcoef(d, a)[0, 1])
    print(f"matched {len(pairs)}/{len(driver)} frames, mouth-openness r={r:.3f}")
    assert r >= 0.7

    # Telemetry reached the client over the 'stats' data channel about once a second.
    assert len(stats) >= SECONDS - 2
    last = stats[-1]
    assert last["type"] == "stats" and last["frames"] > 0 and last["face"] is True
    assert last["stages_ms"]["total"]["p95"] > 0 and last["fps"] >= 10
