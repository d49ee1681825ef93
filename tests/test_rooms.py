"""Rooms: a presenter's avatar and voice reach viewers (signaling viewers and WHEP players);
WHIP presenters; who may do what; every refusal is a clear error and the room keeps streaming."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from helpers import (AvatarClient, ClipTrack, SineTrack, clip, read_seconds, rms, running_server,
                     wait_for)

TOKENS = {"tokens": {"pres": "*"}, "viewer_tokens": {"watch": frozenset({"main"})}}


def drive() -> ClipTrack:
    return ClipTrack(read_seconds(clip("drive_expressive.mp4"), 2.0), loop=True)


async def present(srv, room="main", token=None, audio=True) -> AvatarClient:
    c = await AvatarClient(srv.ws_url).connect()
    await c.start_session(drive(), token=token, room=room, audio=SineTrack() if audio else None)
    return c


async def streaming(client: AvatarClient, frames: int = 10, timeout: float = 20) -> None:
    """Wait until `client` has received `frames` more video frames."""
    n = len(client.received)
    await wait_for(lambda: len(client.received) >= n + frames, timeout, f"{frames} more frames")


async def test_viewer_sees_the_avatar_and_hears_the_presenter(tmp_path, monkeypatch):
    async with running_server(tmp_path, monkeypatch) as srv:
        viewer = await AvatarClient(srv.ws_url).connect()
        hello = await viewer.watch("main")
        assert hello["room"] == "main" and hello["presenter"] is None  # waiting, clearly
        presenter = await present(srv)
        try:
            # The waiting viewer is told, and picks the stream up by itself.
            notice = await viewer.recv()
            assert notice["type"] == "room" and notice["presenter"] == {"identity": "demo"}
            await streaming(viewer, 20)
            await wait_for(lambda: len(viewer.audio) > 50, 10, "audio at the viewer")
            loud = [rms(f) for _, f in viewer.audio[-25:]]
            assert min(loud) > 0.05, loud  # the hum, not silence
            sent = next(iter(srv.state.viewers.values())).audience.audio
            assert sent.forwarded > 50 and sent.encoded == 0  # Opus forwarded, not re-encoded
            assert srv.state.rooms.describe() == [{"room": "main", "presenter": {"identity": "demo"},
                                                   "viewers": 1, "sfu": None}]
            # The presenter leaves: the viewer is told and stays, then a new presenter streams to it.
            await presenter.close()
            assert (await viewer.recv())["presenter"] is None
            presenter = await present(srv)
            assert (await viewer.recv())["presenter"] == {"identity": "demo"}
            await streaming(viewer, 10)
        finally:
            await presenter.close()
            await viewer.close()
        await wait_for(lambda: not srv.state.rooms.rooms and not srv.state.viewers, 5, "the room to go")


def test_opus_packet_durations():
    from server.rooms.audience import opus_samples

    assert opus_samples(bytes([(31 << 3) | 0, 0])) == 960  # CELT 20 ms, one frame
    assert opus_samples(bytes([(1 << 3) | 1, 0])) == 1920  # SILK 20 ms, two frames
    assert opus_samples(bytes([(16 << 3) | 3, 4])) == 480  # CELT 2.5 ms, four frames (code 3)
    assert opus_samples(b"") == 0


async def test_a_viewer_without_opus_gets_the_voice_re_encoded(tmp_path, monkeypatch):
    from aiortc import RTCRtpSender

    async with running_server(tmp_path, monkeypatch) as srv:
        presenter = await present(srv)
        viewer = AvatarClient(srv.ws_url)
        await viewer.connect()
        original = RTCPeerConnection.addTransceiver

        def pcmu_only(pc, kind, direction="sendrecv"):
            t = original(pc, kind, direction=direction)
            if kind == "audio":
                t.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                       if c.mimeType == "audio/PCMU"])
            return t

        monkeypatch.setattr(RTCPeerConnection, "addTransceiver", pcmu_only)
        try:
            await viewer.watch("main")
            await wait_for(lambda: len(viewer.audio) > 50, 15, "PCMU audio at the viewer")
            assert min(rms(f) for _, f in viewer.audio[-25:]) > 0.05
            sent = next(iter(srv.state.viewers.values())).audience.audio
            assert sent.opus_out is False and sent.encoded > 50 and sent.forwarded == 0
        finally:
            await viewer.close()
            await presenter.close()


async def test_roles_and_limits(tmp_path, monkeypatch):
    async with running_server(tmp_path, monkeypatch, max_viewers_per_room=1, **TOKENS) as srv:
        presenter = await present(srv, token="pres")
        try:
            second = await AvatarClient(srv.ws_url).connect()
            assert (await second.hello(token="pres", room="main"))["code"] == "room_busy"
            await second.close()
            c = await AvatarClient(srv.ws_url).connect()  # a viewer token cannot present
            assert (await c.hello(token="watch", room="other"))["code"] == "forbidden"
            await c.close()
            c = await AvatarClient(srv.ws_url).connect()
            with pytest.raises(Exception, match="forbidden"):  # nor watch rooms not on its list
                await c.watch("other", token="watch")
            await c.close()
            viewer = await AvatarClient(srv.ws_url).connect()
            await viewer.watch("main", token="watch")
            reply = await viewer.request({"v": 1, "type": "control", "identity": "demo"})
            assert reply["code"] == "forbidden"  # a viewer never drives
            full = await AvatarClient(srv.ws_url).connect()
            with pytest.raises(Exception, match="busy"):
                await full.watch("main", token="pres")  # the room's one seat is taken
            await full.close()
            await streaming(viewer, 10)
            await viewer.close()
        finally:
            await presenter.close()


async def whip_offer(pc: RTCPeerConnection) -> str:
    await pc.setLocalDescription(await pc.createOffer())
    return pc.localDescription.sdp


async def post(http, url, sdp, token, ctype="application/sdp"):
    headers = {"Content-Type": ctype, **({"Authorization": f"Bearer {token}"} if token else {})}
    async with http.post(url, data=sdp.encode(), headers=headers) as r:
        return r.status, dict(r.headers), await r.text()


async def test_whip_presenter_and_whep_player(tmp_path, monkeypatch):
    async with running_server(tmp_path, monkeypatch, **TOKENS) as srv, aiohttp.ClientSession() as http:
        base = srv.url.rstrip("/")
        camera = RTCPeerConnection()
        camera.addTrack(drive())
        camera.addTrack(SineTrack())
        status, headers, answer = await post(http, f"{base}/whip/main", await whip_offer(camera), "pres")
        assert status == 201 and headers["Content-Type"] == "application/sdp", (status, answer)
        location = headers["Location"]
        assert location.startswith("/whip/main/")
        await camera.setRemoteDescription(RTCSessionDescription(answer, "answer"))

        player = AvatarClient(srv.ws_url)  # its frame collection, over WHEP instead of /ws
        player.pc = pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        pc.on("track", player._on_track)
        status, headers, answer = await post(http, f"{base}/whep/main", await whip_offer(pc), "watch")
        assert status == 201, answer
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        try:
            await streaming(player, 20)
            await wait_for(lambda: len(player.audio) > 25, 10, "audio at the WHEP player")
            assert max(rms(f) for _, f in player.audio[-25:]) > 0.05

            # Refusals: each a clear HTTP error while the room keeps streaming.
            sdp = await whip_offer(RTCPeerConnection())  # no media section: refused before anything is admitted
            assert (await post(http, f"{base}/whep/main", sdp, "nope"))[0] == 401
            assert (await post(http, f"{base}/whip/main", sdp, "pres"))[0] == 400
            second = RTCPeerConnection()
            second.addTrack(drive())
            camera_sdp = await whip_offer(second)
            await second.close()
            assert (await post(http, f"{base}/whip/main", camera_sdp, "watch"))[0] == 403
            assert (await post(http, f"{base}/whip/main", camera_sdp, "pres"))[0] == 409  # one presenter
            sender = RTCPeerConnection()
            sender.addTransceiver(drive(), direction="sendonly")
            send_only = await whip_offer(sender)
            await sender.close()
            assert (await post(http, f"{base}/whep/main", send_only, "pres"))[0] == 400  # a viewer receives
            assert (await post(http, f"{base}/whep/empty", pc.localDescription.sdp, "pres"))[0] == 404
            assert (await post(http, f"{base}/whep/Bad..Room", sdp, "pres"))[0] == 400
            assert (await post(http, f"{base}/whep/main", sdp, "pres", "text/plain"))[0] == 415
            assert (await post(http, f"{base}/whep/main", "v=0\r\n" + "a=x\r\n" * 20000, "pres"))[0] == 413
            assert (await post(http, f"{base}/whep/main", "hello", "pres"))[0] == 400
            async with http.patch(base + location, headers={"Authorization": "Bearer pres"}) as r:
                assert r.status == 405  # no trickle
            async with http.delete(base + location, headers={"Authorization": "Bearer watch"}) as r:
                assert r.status == 404  # not the token that made it
            async with http.delete(base + location.replace("/main/", "/other/"),
                                   headers={"Authorization": "Bearer pres"}) as r:
                assert r.status == 404
            await streaming(player, 10)

            async with http.delete(base + location, headers={"Authorization": "Bearer pres"}) as r:
                assert r.status == 200
            await wait_for(lambda: srv.state.rooms.live("main") is None, 5, "the WHIP session to end")
            assert srv.state.metrics.sessions_active == 0
        finally:
            await camera.close()
            await player.close()
        await wait_for(lambda: not srv.state.viewers, 10, "the WHEP player to be gone")


async def test_whip_call_frame_is_composed_into_the_identitys_scene(tmp_path, monkeypatch):
    """?frame=1280x720 (the in-call extension's): the session sends the avatar pasted back into
    the demo's own photo at that size, to its publisher and the room alike; a frame it cannot
    send is refused before anything is admitted."""
    async with running_server(tmp_path, monkeypatch, **TOKENS) as srv, aiohttp.ClientSession() as http:
        base = srv.url.rstrip("/")
        refused = RTCPeerConnection()
        refused.addTrack(drive())
        sdp = await whip_offer(refused)
        await refused.close()
        for bad in ("1281x720", "4000x2250", "16x9", "big", "1280x720x3"):
            status, _, text = await post(http, f"{base}/whip/main?frame={bad}", sdp, "pres")
            assert status == 400 and "frame" in text, (bad, status, text)
        assert not srv.state.sessions and srv.state.metrics.sessions_active == 0

        camera = RTCPeerConnection()
        camera.addTrack(drive())
        status, headers, answer = await post(http, f"{base}/whip/main?frame=960x540", await whip_offer(camera), "pres")
        assert status == 201, answer
        await camera.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        viewer = AvatarClient(srv.ws_url, keep_frames=True)
        try:
            await viewer.connect()
            await viewer.watch("main", "watch")
            await streaming(viewer, 15)
            frame = viewer.received[-1][2]
            assert frame.shape == (540, 960, 3), frame.shape
            # Beside the face is the demo's photo (its flag on the left), not plain bars.
            assert frame[:, :120].std() > 20, frame[:, :120].std()
            session = next(iter(srv.state.sessions.values()))
            assert session.frame == (960, 540) and session.stats.summary()["stages_ms"]["compose"]["p50"] > 0
        finally:
            await viewer.close()
            await camera.close()


async def test_avatar_rooms_lists_who_presents(tmp_path, monkeypatch, capsys):
    from server.cli import main

    async with running_server(tmp_path, monkeypatch, **TOKENS) as srv:
        presenter = await present(srv, token="pres", audio=False)
        try:
            code = await asyncio.to_thread(main, ["rooms", "--url", srv.url, "--token", "watch"])
            assert code == 0 and "main" in capsys.readouterr().out
            code = await asyncio.to_thread(main, ["rooms", "--url", srv.url, "--token", "wrong"])
            assert code == 2 and "401" in capsys.readouterr().err
        finally:
            await presenter.close()
    code = await asyncio.to_thread(main, ["rooms", "--url", srv.url])
    assert code == 2 and "cannot reach" in capsys.readouterr().err


async def test_whip_when_every_session_slot_is_taken(tmp_path, monkeypatch):
    async with running_server(tmp_path, monkeypatch, max_sessions=1) as srv, aiohttp.ClientSession() as http:
        presenter = await present(srv, audio=False)
        try:
            camera = RTCPeerConnection()
            camera.addTrack(drive())
            status, headers, body = await post(http, f"{srv.url}whip/other", await whip_offer(camera), None)
            assert status == 503 and headers["Retry-After"] and "limit of 1" in body, (status, body)
            await camera.close()
            await streaming(presenter, 5)  # the presenter is unaffected
        finally:
            await presenter.close()
