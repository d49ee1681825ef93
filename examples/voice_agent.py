#!/usr/bin/env python3
"""A voice agent for the avatar server (docs/PROTOCOL.md, "Voice agents"): it joins a room as
the avatar's voice, pushes speech (a WAV file's PCM in real time, or a text the server says
with eSpeak NG), optionally barges in after some seconds, and prints what the server reports
(playback_finished, errors). The room's viewers (viewer.html?room=NAME) see and hear it.

    python examples/voice_agent.py --room main --say "Hello, I am an avatar."
    python examples/voice_agent.py --room main --wav speech.wav --interrupt-after 2
    AVATAR_TOKEN=s3cret python examples/voice_agent.py --url wss://host:8443/ws --room main --say "Hi"

The WAV must be 16-bit PCM mono at 16000 or 48000 Hz (convert with
`ffmpeg -i in.mp3 -ac 1 -ar 16000 -sample_fmt s16 out.wav`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import wave

import websockets

CHUNK_SECONDS = 0.1  # PCM per binary frame


async def run(args) -> int:
    async with websockets.connect(args.url, max_size=2 ** 20) as ws:
        hello = {"v": 1, "type": "hello", "role": "agent", "room": args.room, "identity": args.identity}
        if args.token:
            hello["token"] = args.token
        pcm, rate = b"", 16000
        if args.wav:
            with wave.open(args.wav) as w:
                if w.getsampwidth() != 2 or w.getnchannels() != 1 or w.getframerate() not in (16000, 48000):
                    print("the WAV must be 16-bit mono at 16000 or 48000 Hz", file=sys.stderr)
                    return 2
                rate, pcm = w.getframerate(), w.readframes(w.getnframes())
        hello["sample_rate"] = rate
        await ws.send(json.dumps(hello))
        reply = json.loads(await ws.recv())
        if reply.get("type") != "session":
            print(f"refused: {reply.get('code')}: {reply.get('message')}", file=sys.stderr)
            return 1
        print(f"session {reply['id'][:8]}: identity {reply['identity']} in room {reply['room']}")
        started = time.monotonic()

        async def push():
            if args.say:
                await ws.send(json.dumps({"type": "say", "text": args.say}))
            step = int(rate * CHUNK_SECONDS) * 2
            for i in range(0, len(pcm), step):  # in real time: the server buffers at most 10 s
                await ws.send(pcm[i:i + step])
                await asyncio.sleep(CHUNK_SECONDS * 0.95)
            if args.interrupt_after is not None:
                await asyncio.sleep(max(0.0, started + args.interrupt_after - time.monotonic()))
                await ws.send(json.dumps({"type": "interrupt"}))
                print(f"{time.monotonic() - started:6.2f} s  interrupt sent")

        sender = asyncio.ensure_future(push())
        try:
            async for raw in ws:
                msg = json.loads(raw)
                print(f"{time.monotonic() - started:6.2f} s  {msg}")
                if msg.get("type") == "playback_finished" and sender.done():
                    break
                if msg.get("type") == "error" and msg.get("code") not in ("overflow",):
                    return 1
        finally:
            sender.cancel()
        await ws.send(json.dumps({"type": "bye"}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8080/ws", help="the server's signaling WebSocket")
    parser.add_argument("--token", default=os.environ.get("AVATAR_TOKEN"),
                        help="a presenter token (default: $AVATAR_TOKEN; none in demo mode)")
    parser.add_argument("--room", required=True, help="the room whose viewers see the avatar speak")
    parser.add_argument("--identity", default="demo", help="the identity to animate (default: demo)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--wav", help="push this WAV's speech (16-bit mono, 16000 or 48000 Hz) in real time")
    what.add_argument("--say", help="have the server say this text (eSpeak NG; at most 2000 characters)")
    parser.add_argument("--interrupt-after", type=float, metavar="SECONDS",
                        help="barge in this many seconds after the session starts (drops what is queued)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
