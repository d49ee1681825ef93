"""The `avatar` command: serve, render, identity management."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Quiet mediapipe/TFLite's C++ start-up chatter before anything imports it.
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from engines.identity import (DEFAULT_IDENTITY, USES, Consent, IdentityError, IdentityStore,  # noqa: E402
                              default_home, identities_dir)
from engines.neural.runtime import PREFERENCES as BACKEND_CHOICES  # noqa: E402
from server.media.stages import single_threaded_blas  # noqa: E402

EPILOG = """examples:
  avatar serve                                   web client + signaling on http://127.0.0.1:8080
  avatar rooms                                   who presents and who watches on a running server
  avatar extension -o ~/avatar-camera --server http://127.0.0.1:8080/   the in-call browser camera
  avatar camera                                  your avatar as the system's virtual camera
  avatar render drive.mp4 -o out.mp4 --side-by-side
  avatar identity create --image me.jpg --name me --consent "I, Jo Doe, agree to ..."
  avatar identity list
  avatar enroll selfscan.mp4 --name me --consent "I, Jo Doe, agree to ..." --preset quick
  avatar eval me                                 neural vs warp on the held-out frames
  avatar bench engines

Identities live in $AVATAR_HOME/identities (default ~/.local/share/avatar). The demo
identity is created on first use from a public-domain NASA portrait."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("aioice", "aiortc", "websockets.server"):  # per-candidate and per-request logs drown what matters
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    single_threaded_blas()
    try:
        return args.func(args) or 0
    except (IdentityError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avatar", description="Real-time streaming avatar server: your head pose and expression, "
        "live, on a consenting identity's face.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None,
                        help="data folder (default: $AVATAR_HOME or ~/.local/share/avatar)")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="serve the web client and WebRTC avatar sessions",
        description="Serve the web client, the signaling WebSocket, WHIP (/whip/ROOM) and WHEP "
        "(/whep/ROOM) on one port. A presenter who names a room is watched there by viewers "
        "(/viewer.html?room=ROOM, or any WHEP player); viewer tokens come from AVATAR_VIEWER_TOKENS "
        "('token:room1,room2;...') or the config file's viewer_tokens.")
    serve.set_defaults(func=cmd_serve)
    from server import config
    config.add_arguments(serve)

    rooms = sub.add_parser("rooms", help="list the live rooms of a running server",
                           description="List a running server's rooms: presenter identity, viewer count, "
                           "SFU publishing. Reads GET /rooms.")
    rooms.add_argument("--url", default="http://127.0.0.1:8080/", help="the server (default: %(default)s)")
    rooms.add_argument("--token", default=os.environ.get("AVATAR_TOKEN"),
                       help="a presenter or viewer token (default: $AVATAR_TOKEN; none in demo mode)")
    rooms.add_argument("--json", action="store_true", help="print the JSON as the server sent it")
    rooms.set_defaults(func=cmd_rooms)

    nodes = sub.add_parser("nodes", help="list the nodes of a cluster of avatar servers (serve --cluster)",
                           description="List every node of the cluster a running server belongs to: its URL, "
                           "capacity, sessions, reserved slots, CPU load and state. Reads GET /nodes "
                           "(docs/CLUSTER.md).")
    nodes.add_argument("--url", default="http://127.0.0.1:8080/", help="any node (default: %(default)s)")
    nodes.add_argument("--token", default=os.environ.get("AVATAR_TOKEN"),
                       help="a presenter or viewer token (default: $AVATAR_TOKEN; none in demo mode)")
    nodes.add_argument("--json", action="store_true", help="print the JSON as the server sent it")
    nodes.set_defaults(func=cmd_nodes)

    drain = sub.add_parser("drain", help="stop a running server taking new presenters; its sessions move",
                           description="Ask a server on this machine to drain, as SIGTERM does but without "
                           "stopping: /healthz answers 503, new presenters are refused (with --cluster, "
                           "placed on other nodes), and running sessions get --drain-timeout seconds to end "
                           "before they are told to connect again. Only the server's own machine may ask.")
    drain.add_argument("--url", default="http://127.0.0.1:8080/", help="the server (default: %(default)s)")
    drain.set_defaults(func=cmd_drain)

    ext = sub.add_parser(
        "extension", help="write the \"Avatar camera\" browser extension, configured for a server",
        description="Write the \"Avatar camera\" extension (Chromium, Chrome, Edge; Manifest V3) as an "
        "unpacked folder: every page then sees one more camera, \"Avatar camera (IDENTITY)\"; a video "
        "call that picks it gets your avatar (your real camera goes to the server over WHIP) and, with "
        "audio, your microphone delayed to match. Load it at chrome://extensions: Developer mode, "
        "Load unpacked, pick DIR. Its options page changes the settings later.")
    ext.add_argument("-o", "--out", type=Path, required=True, metavar="DIR", help="the folder to write")
    ext.add_argument("--server", required=True, metavar="URL", help="the avatar server, e.g. http://127.0.0.1:8080/")
    ext.add_argument("--token", help="a presenter token (written into DIR/config.json, readable by you only)")
    ext.add_argument("--identity", help="the identity to appear as (default: the server's demo)")
    ext.add_argument("--room", help="also show the avatar to this room's viewers (default: a private room)")
    ext.set_defaults(func=cmd_extension)

    from server import camera
    cam = sub.add_parser("camera", help="your avatar as the system's virtual camera, for desktop call apps",
                         description=camera.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    camera.add_arguments(cam)
    cam.set_defaults(func=cmd_camera)

    render = sub.add_parser("render", help="reenact a driving video offline, or animate an identity with speech",
                            description="Reenact a driving video with an identity, or (--audio) have the "
                            "identity speak a recording: its mouth from the phones recognized in it, its "
                            "head and eyes alive. Keeps the audio track and prints (and writes) per-stage "
                            "timings.")
    render.add_argument("driving", type=Path, nargs="?", help="driving video (any format FFmpeg reads)")
    render.add_argument("--audio", type=Path, default=None, metavar="SPEECH",
                        help="instead of a driving video: speech (any audio or video file FFmpeg reads) "
                        "that drives the identity's mouth")
    render.add_argument("-o", "--output", type=Path, required=True, help="output video (.mp4, .mov, .mkv)")
    render.add_argument("--identity", default=DEFAULT_IDENTITY, help="identity name (default: %(default)s)")
    render.add_argument("--side-by-side", action="store_true", help="driver on the left, avatar on the right")
    render.add_argument("--expression-gain", type=float, default=1.0, help="0..2 (default: 1)")
    render.add_argument("--head-gain", type=float, default=1.0, help="0..2 (default: 1)")
    render.add_argument("--freeze-head", action="store_true", help="keep the identity's head still")
    render.add_argument("--label", action=argparse.BooleanOptionalAction, default=None,
                        help="draw the visible \"AI avatar\" badge (default: the identity's setting, "
                        "on unless its owner turned it off)")
    render.add_argument("--c2pa-cert", type=Path, default=os.environ.get("AVATAR_C2PA_CERT"),
                        help="PEM certificate chain that signs the render's C2PA manifest (default: "
                        "$AVATAR_C2PA_CERT, else a local certificate made once under the home)")
    render.add_argument("--c2pa-key", type=Path, default=os.environ.get("AVATAR_C2PA_KEY"),
                        help="its private key, PEM (default: $AVATAR_C2PA_KEY)")
    render.add_argument("--timings", type=Path, default=None,
                        help="where to write the timing JSON (default: OUTPUT with .timings.json)")
    render.set_defaults(func=cmd_render)

    from engines.voice.espeak import DEFAULT_VOICE, MAX_TEXT_CHARS
    say = sub.add_parser("say", help="an identity says a text (eSpeak NG's voice), offline",
                         description="Speak TEXT with eSpeak NG and render the identity saying it: its "
                         "mouth follows the phonemes the synthesizer reports, its head and eyes alive. "
                         "The video is watermarked, badged, C2PA-signed and audited as `avatar render`.")
    say.add_argument("text", help=f"what to say (at most {MAX_TEXT_CHARS} characters)")
    say.add_argument("-o", "--output", type=Path, required=True, help="output video (.mp4, .mov, .mkv)")
    say.add_argument("--identity", default=DEFAULT_IDENTITY, help="identity name (default: %(default)s)")
    say.add_argument("--voice", default=DEFAULT_VOICE,
                     help="eSpeak NG voice (default: %(default)s; `espeak-ng --voices` lists them)")
    say.add_argument("--label", action=argparse.BooleanOptionalAction, default=None,
                     help="draw the visible \"AI avatar\" badge (default: the identity's setting)")
    say.add_argument("--c2pa-cert", type=Path, default=os.environ.get("AVATAR_C2PA_CERT"),
                     help="PEM certificate chain that signs the C2PA manifest (default: $AVATAR_C2PA_CERT, "
                     "else a local certificate made once under the home)")
    say.add_argument("--c2pa-key", type=Path, default=os.environ.get("AVATAR_C2PA_KEY"),
                     help="its private key, PEM (default: $AVATAR_C2PA_KEY)")
    say.add_argument("--timings", type=Path, default=None, help="also write the timing JSON here")
    say.set_defaults(func=cmd_say)

    verify = sub.add_parser(
        "verify", help="does a video or image carry the avatar watermark?",
        description="Look for the invisible watermark every avatar frame carries (and a signed "
        "C2PA manifest on renders); print the payload (server id and the use id that `avatar "
        "audit --id` finds) and a confidence: the share of 2-second segments that carry it. "
        "Exit status: 0 marked, 1 not marked, 2 error.")
    verify.add_argument("file", type=Path, help="a video (any format FFmpeg reads) or an image")
    verify.add_argument("--json", action="store_true", help="print the full report as JSON")
    verify.set_defaults(func=cmd_verify)

    enroll = sub.add_parser("enroll", help="train a neural identity from a self-scan video",
                            description="Train a person's generator from a self-scan video (about "
                            "30 s, turning the head, talking, blinking) and write a neural identity. "
                            "The last 20% of the frames are held out for evaluation. Progress is "
                            "checkpointed; rerunning the same command resumes.")
    enroll.add_argument("video", type=Path, help="the self-scan video of the consenting person")
    add_identity_arguments(enroll)
    enroll.add_argument("--preset", choices=("quick", "default", "quality"), default="default",
                        help="quick (<10 min), default (<60 min) or quality (default: %(default)s)")
    enroll.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    enroll.add_argument("--max-frames", type=int, default=None, help="use only the first N frames")
    enroll.add_argument("--overwrite", action="store_true", help="replace an existing identity of that name")
    enroll.add_argument("--fresh", action="store_true", help="ignore an earlier checkpoint and start over")
    enroll.add_argument("--no-bf16", action="store_true", help="train in float32 even if the CPU has bf16")
    enroll.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where to train (default: %(default)s; cuda is untested on these machines)")
    enroll.add_argument("--resolution", type=int, choices=(256, 512), default=512,
                        help="the output's side in pixels, or the face's own side in the video when that "
                             "is smaller (default: %(default)s). The generator trains at 256 either way; "
                             "a larger output carries its correction onto a warp at that size")
    enroll.set_defaults(func=cmd_enroll)

    ev = sub.add_parser("eval", help="compare a neural identity against the warp engine",
                        description="PSNR, SSIM, L1, AKD, mouth/eye-openness correlation, flicker and "
                        "identity distance (dlib, with the identity extra) for the neural and warp "
                        "engines on the same frames; JSON + HTML report. A warp identity (the demo) "
                        "is evaluated alone, with --driving.")
    ev.add_argument("name", help="a neural identity, or a warp identity with --driving")
    ev.add_argument("--driving", type=Path, default=None,
                    help="reenact this video instead of the held-out enrollment frames (no ground truth)")
    ev.add_argument("--max-frames", type=int, default=None, help="evaluate at most N frames")
    ev.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                    help="generator runtime (default: auto, the one `avatar serve` would pick)")
    ev.add_argument("-o", "--output", type=Path, default=None,
                    help="report path without suffix (default: ./eval-NAME); writes .json and .html")
    ev.add_argument("--no-identity-distance", action="store_true",
                    help="skip the dlib identity distances (about 20 s for 300 frames)")
    ev.add_argument("--output-size", type=int, default=None, metavar="PX",
                    help="render no larger than PX, as `avatar serve --output-size` does (default: the "
                         "identity's own size); compare two runs' detail and psnr_256")
    ev.set_defaults(func=cmd_eval)

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(title="benchmarks", metavar="WHAT")
    be = bsub.add_parser("engines", help="median/p95 ms per pipeline stage and generator backend")
    be.add_argument("--identity", default=DEFAULT_IDENTITY, help="identity (default: %(default)s)")
    be.add_argument("--driving", type=Path, default=None, help="driver frames (default: the identity's reference)")
    be.add_argument("-n", type=int, default=30, help="timed runs per stage (default: %(default)s)")
    be.add_argument("--json", type=Path, default=None, help="also write the results here")
    be.set_defaults(func=cmd_bench_engines)
    live = bsub.add_parser("live", help="glass-to-glass latency of a live server under load",
                           description="Headless WebRTC clients stream a clip at camera rate to a "
                           "server and match every avatar frame to the camera frame it shows. Prints "
                           "a table; writes JSON, an HTML report with plots, and a PNG.")
    from server.bench import command as bench_live
    bench_live.add_arguments(live)
    live.set_defaults(func=cmd_bench_live)
    from server.bench import in_call as bench_in_call
    bic = bsub.add_parser("in-call", help="the Avatar camera extension's cost against the presenter page",
                          description=bench_in_call.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_in_call.add_arguments(bic)
    bic.set_defaults(func=bench_in_call.run)
    from server.bench import watermark as bench_watermark
    bw = bsub.add_parser("watermark", help="does the invisible mark survive codecs and scaling; cost; PSNR",
                         description=bench_watermark.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_watermark.add_arguments(bw)
    bw.set_defaults(func=bench_watermark.run)
    from engines.voice import bench as bench_lipsync
    bls = bsub.add_parser("lipsync", help="does the voice drive the mouth: eSpeak NG and a real voice; CPU",
                          description=bench_lipsync.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_lipsync.add_arguments(bls)
    bls.set_defaults(func=cmd_bench_lipsync)
    bench.set_defaults(func=lambda a: bench.print_help() or 2)

    from engines.neural import tensorrt_build
    trt = sub.add_parser("export-trt", help="build a TensorRT engine for this GPU from a generator ONNX",
                         description=tensorrt_build.DESCRIPTION)
    tensorrt_build.add_arguments(trt)
    trt.set_defaults(func=cmd_export_trt)

    from server import audit
    aud = sub.add_parser("audit", help="who used which identity, when (sessions, viewers, renders, enrollments)",
                         description="Read the append-only audit log ($AVATAR_HOME/audit.db): one row per "
                         "use, with the token id (never the token), identity, client address, start, end, "
                         "frames and how it ended. A watermark's use id finds its row with --id.")
    audit.add_arguments(aud)
    aud.set_defaults(func=lambda a: audit.run(a, a.home))

    ident = sub.add_parser("identity", help="create, list, show, style, revoke, label or delete identities")
    isub = ident.add_subparsers(title="identity commands", metavar="ACTION")
    create = isub.add_parser("create", help="create an identity from one photo (warp engine)")
    create.add_argument("--image", type=Path, required=True, help="a frontal photo of one person")
    add_identity_arguments(create)
    create.set_defaults(func=cmd_identity_create)
    isub.add_parser("list", help="list identities").set_defaults(func=cmd_identity_list)
    show = isub.add_parser("show", help="print an identity's manifest")
    show.add_argument("name")
    show.set_defaults(func=cmd_identity_show)
    revoke = isub.add_parser("revoke", help="revoke an identity's consent: every use stops, the record stays",
                             description="Mark the identity's consent revoked. New sessions, renders and "
                             "enrollments are refused; live sessions using it end within a second "
                             "(error consent_revoked). The bundle and its consent record are kept.")
    revoke.add_argument("name")
    revoke.add_argument("--reason", default="", help="why (kept with the record)")
    revoke.add_argument("--by", default=os.environ.get("USER", "operator"), help="who revokes (default: $USER)")
    revoke.set_defaults(func=cmd_identity_revoke)
    from engines.render.style import STYLES

    style = isub.add_parser("style", help="make a stylized identity from an existing one (painted, toon)",
                            description="Repaint an identity's face and the scene around it in a look, "
                            "once, as a new identity: animated live like any other, at no cost per frame, "
                            "watermarked like any other. An enrolled identity's generator is trained again "
                            "on its own self-scan, restyled (minutes, as `avatar enroll`; the scan its "
                            "manifest names must still be there). It inherits the consent record: its scope and expiry "
                            "apply, and revoking the original revokes it too. Looks: "
                            + "; ".join(f"{k}: {v}" for k, v in STYLES.items()) + ".")
    style.add_argument("name", help="the identity to restyle")
    style.add_argument("--style", required=True, choices=tuple(STYLES), help="the look")
    style.add_argument("--name", dest="new_name", required=True, help="the new identity's name")
    style.add_argument("--display-name", default=None, help="shown in the web client (default: the "
                       "original's, with the style)")
    style.add_argument("--overwrite", action="store_true", help="replace an existing identity of that name")
    style.add_argument("--preset", choices=("quick", "default", "quality"), default="quick",
                       help="an enrolled identity's training preset (default: %(default)s), as `avatar enroll`")
    style.add_argument("--steps", type=int, default=None, help="an enrolled identity's training steps "
                       "(default: the preset's)")
    style.set_defaults(func=cmd_identity_style)
    label = isub.add_parser("label", help="show viewers the visible \"AI avatar\" badge, or not",
                            description="Turn the visible badge on or off for this identity's viewers and "
                            "renders (on by default). The invisible watermark stays either way.")
    label.add_argument("name")
    label.add_argument("state", choices=("on", "off"))
    label.set_defaults(func=cmd_identity_label)
    delete = isub.add_parser("delete", help="delete an identity and its files")
    delete.add_argument("name")
    delete.set_defaults(func=cmd_identity_delete)
    ident.set_defaults(func=lambda a: ident.print_help() or 2)
    return parser


def add_identity_arguments(parser: argparse.ArgumentParser) -> None:
    """Name, display name and the consent record: every way of creating an identity asks for them."""
    parser.add_argument("--name", required=True, help="identifier: lowercase letters, digits, - and _")
    parser.add_argument("--display-name", default=None, help="shown in the web client (default: the name)")
    parser.add_argument("--consent", required=True,
                        help="the consent record: who agreed, to what (stored with the identity)")
    parser.add_argument("--subject", default=None, help="who is depicted (default: the display name)")
    parser.add_argument("--recorded-by", default=os.environ.get("USER", "operator"),
                        help="who recorded the consent (default: $USER)")
    parser.add_argument("--scope", default=",".join(USES),
                        help="comma-separated uses consented to, of: " + ", ".join(USES) + " (default: all)")
    parser.add_argument("--expires", default=None, metavar="DATE",
                        help="the consent ends then (ISO 8601 date or time, UTC); no use after it")


def store(args) -> IdentityStore:
    return IdentityStore(identities_dir(args.home))


def cmd_serve(args) -> int:
    from server.http import app
    return app.run(args)


def get_json(url: str, path: str, token: str | None) -> dict:
    """GET url/path of a running server with a bearer token; RuntimeError saying what failed."""
    return json.loads(ask_server(url, path, token))


def ask_server(url: str, path: str, token: str | None = None, method: str = "GET") -> str:
    """The body of url/path of a running server; RuntimeError saying what failed."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url.rstrip("/") + "/" + path, method=method,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url} refused: {e.code} {e.read().decode(errors='replace').strip()}")
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"cannot reach an avatar server at {url}: {getattr(e, 'reason', e)}")


def cmd_drain(args) -> int:
    print(ask_server(args.url, "drain", method="POST").strip())
    return 0


def cmd_rooms(args) -> int:
    body = get_json(args.url, "rooms", args.token)
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    rooms = body.get("rooms", [])
    if not rooms:
        print("no live rooms")
    for r in rooms:
        who = r["presenter"]["identity"] if r["presenter"] else "(no presenter)"
        sfu = f"  SFU: {r['sfu']}" if r.get("sfu") else ""
        node = f"  node {r['node']} {r['url']}" if r.get("node") else ""
        print(f"{r['room']:<20} {who:<20} {r['viewers']} direct viewer(s){sfu}{node}")
    if body.get("cluster"):
        print(f"cluster: {body['cluster']}")
    return 0


def cmd_nodes(args) -> int:
    body = get_json(args.url, "nodes", args.token)
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    if body.get("cluster") is None:
        print("this server is not in a cluster (serve --cluster)")
    elif body["cluster"] != "ok":
        print(f"cluster: {body['cluster']} (this node only)")
    print(f"{'node':<14} {'url':<32} {'sessions':>8} {'reserved':>8} {'capacity':>8} {'load':>6}  state")
    for n in body.get("nodes", []):
        load = "-" if n.get("load") is None else f"{n['load']:.2f}"
        state = (n.get("state") or "?") + ("" if n.get("allowed", True) else ", not in --cluster-allow") \
            + (" (this one)" if n.get("self") else "")
        print(f"{n.get('id') or '-':<14} {n.get('url') or '-':<32} {n['sessions']:>8} {n.get('reserved', 0):>8} "
              f"{n['capacity']:>8} {load:>6}  {state}")
    return 0


def cmd_extension(args) -> int:
    from server.extension import write_extension

    try:
        out = write_extension(args.out, args.server, args.token, args.identity, args.room)
    except ValueError as e:
        raise RuntimeError(str(e)) from None
    print(f"wrote the Avatar camera extension to {out}\n"
          "load it at chrome://extensions (Developer mode, Load unpacked), then pick "
          "\"Avatar camera\" as the camera in your call")
    return 0


def cmd_camera(args) -> int:
    from server import camera
    return camera.run_command(args)


def cmd_render(args) -> int:
    if (args.driving is None) == (args.audio is None):
        raise ValueError("give either a driving video or --audio SPEECH")
    if args.audio is not None:
        return cmd_render_audio(args)
    from engines.retarget import RetargetControls
    from engines.video import open_video
    from engines.provenance.c2pa_sign import sign_file
    from engines.reenact import format_summary, render_video, write_summary
    from engines.provenance.watermark import Marker, Payload
    from server.audit import AuditLog, audit_path, local_user

    open_video(args.driving).close()  # fail on a bad input before loading anything else
    controls = RetargetControls(args.expression_gain, args.head_gain, args.freeze_head).validated()
    identity = store(args).load(args.identity)
    identity.consent.check("offline-render")
    signer = _c2pa_signer(args)  # a bad certificate fails before minutes of rendering
    log = AuditLog(audit_path(args.home), "avatar render")
    try:
        with log.use("render", local_user(), identity.name, address="local") as use:
            marker = Marker(Payload.here(use.id))
            label = identity.label_viewers if args.label is None else args.label
            summary = render_video(args.driving, identity, args.output, args.side_by_side, controls,
                                   progress=True, marker=marker, label=label)
            use.frames = summary.frames
            if signer is not None:
                sign_file(args.output, identity_name=identity.name, consent=identity.consent.__dict__,
                          signer=signer, payload=str(marker.payload))
    finally:
        log.close()
    timings = args.timings or args.output.with_suffix(".timings.json")
    write_summary(summary, timings)
    print(format_summary(summary))
    print(f"timings written to {timings}")
    print(f"watermark: {marker.payload} (`avatar audit --id {use.id[:8]}`)" +
          ("; C2PA manifest signed" if signer is not None else
           f"; no C2PA manifest ({args.output.suffix} cannot carry one: render to .mp4 or .mov)"))
    return 0


def cmd_render_audio(args) -> int:
    from engines.voice.audio import load_audio
    from engines.voice.recognize import recognize_speech

    if args.side_by_side or args.freeze_head or args.expression_gain != 1.0 or args.head_gain != 1.0:
        raise ValueError("--side-by-side, --freeze-head and the gains need a driving video, not --audio")
    speech = load_audio(args.audio)  # fail on a bad input before loading anything else

    def recognized():
        return recognize_speech(speech), "recognize"
    timings = args.timings or args.output.with_suffix(".timings.json")
    return _render_speaking(args, "avatar render", recognized, timings)


def cmd_say(args) -> int:
    from engines.voice.espeak import check_text, synthesize

    text = check_text(args.text)  # empty or too long: an error before anything is loaded
    return _render_speaking(args, "avatar say", lambda: (synthesize(text, args.voice), "synthesize"), args.timings)


def _render_speaking(args, program: str, make_speech, timings: Path | None) -> int:
    """The identity speaking make_speech()'s speech, marked, badged, signed and audited as cmd_render."""
    import time

    from engines.provenance.c2pa_sign import sign_file
    from engines.provenance.watermark import Marker, Payload
    from engines.reenact import RenderError, write_summary
    from engines.voice.render import OUTPUTS, format_summary, render_speech
    from server.audit import AuditLog, audit_path, local_user

    if args.output.suffix.lower() not in OUTPUTS:
        raise RenderError(f"{args.output}: output must end in .mp4, .mov or .mkv")
    identity = store(args).load(args.identity)
    identity.consent.check("offline-render")
    signer = _c2pa_signer(args)
    started = time.perf_counter()
    speech, made_by = make_speech()
    made_ms = (time.perf_counter() - started) * 1e3
    log = AuditLog(audit_path(args.home), program)
    try:
        with log.use("render", local_user(), identity.name, address="local") as use:
            marker = Marker(Payload.here(use.id))
            label = identity.label_viewers if args.label is None else args.label
            summary = render_speech(speech, identity, args.output, marker=marker, label=label,
                                    extra_stages={made_by: made_ms})
            use.frames = summary.frames
            if signer is not None:
                sign_file(args.output, identity_name=identity.name, consent=identity.consent.__dict__,
                          signer=signer, payload=str(marker.payload))
    finally:
        log.close()
    print(format_summary(summary, speech.duration))
    if timings is not None:
        write_summary(summary, timings)
        print(f"timings written to {timings}")
    print(f"watermark: {marker.payload} (`avatar audit --id {use.id[:8]}`)" +
          ("; C2PA manifest signed" if signer is not None else
           f"; no C2PA manifest ({args.output.suffix} cannot carry one: render to .mp4 or .mov)"))
    return 0


def cmd_bench_lipsync(args) -> int:
    from engines.voice import bench as bench_lipsync

    identity = store(args).load(args.identity)
    report = bench_lipsync.bench(identity, args.sentences, args.seed, args.voice, args.clip, args.repeats)
    print(bench_lipsync.format_table(report))
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.json}")
    return 0


def _c2pa_signer(args):
    """The signer for render manifests, or None for a container C2PA cannot sign."""
    from engines.provenance.c2pa_sign import FORMATS, load_signer, local_signer

    if args.output.suffix.lower() not in FORMATS:
        return None
    if (args.c2pa_cert is None) != (args.c2pa_key is None):
        raise IdentityError("--c2pa-cert and --c2pa-key go together")
    if args.c2pa_cert is not None:
        return load_signer(args.c2pa_cert, args.c2pa_key)
    return local_signer(Path(args.home or default_home()) / "c2pa")


def cmd_verify(args) -> int:
    from engines.provenance.verify import verify_file

    from engines.provenance.c2pa_sign import FORMATS, read_provenance

    verdict = verify_file(args.file)
    report = verdict.as_dict()
    c2pa = read_provenance(args.file) if args.file.suffix.lower() in FORMATS else None
    report["c2pa"] = c2pa
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        marked = sum(s.payload is not None for s in verdict.segments)
        where = "segment" if verdict.kind == "video" else "image"
        if verdict.found:
            print(f"{args.file}: avatar watermark FOUND: {verdict.payload} "
                  f"(confidence {verdict.confidence:.0%}: {marked} of {len(verdict.segments)} {where}s)")
        else:
            print(f"{args.file}: no avatar watermark ({verdict.frames} frames, {len(verdict.segments)} {where}s checked)")
        print(_describe_c2pa(c2pa))
    return 0 if verdict.found or (c2pa is not None and c2pa["valid"]) else 1


def _describe_c2pa(c2pa: dict | None) -> str:
    if c2pa is None:
        return "C2PA manifest: none"
    if not c2pa["valid"]:
        problems = "; ".join(f"{p['code']}: {p['explanation']}" for p in c2pa["problems"])
        return f"C2PA manifest: INVALID, the file was changed after signing or the signature is bad ({problems})"
    who = c2pa.get("identity") or {}
    trust = "trusted signer" if c2pa["trusted"] else "signer not in any trust list (a local certificate)"
    return (f"C2PA manifest: valid, {trust}: {c2pa['signer'].get('common_name')}; made by {c2pa['generator']}"
            + (", AI-generated" if c2pa["ai_generated"] else "")
            + (f"; identity {who.get('identity')!r}, consent of {who.get('consent_subject')!r}" if who else ""))


def cmd_identity_create(args) -> int:
    consent = _consent(args)
    identity = store(args).create_from_image(args.image, args.name, consent, args.display_name)
    print(f"created identity {identity.name!r} in {identity.path}")
    return 0


def _consent(args) -> Consent:
    from datetime import datetime, timezone

    consent = Consent(
        statement=args.consent.strip(),
        subject=args.subject or args.display_name or args.name,
        recorded_by=args.recorded_by,
        granted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        scope=[s.strip() for s in args.scope.split(",") if s.strip()],
        expires_at=_expiry(args.expires),
    )
    unknown = set(consent.scope) - set(USES)
    if unknown:
        raise IdentityError(f"--scope: unknown use(s) {', '.join(sorted(unknown))} (known: {', '.join(USES)})")
    Consent.from_dict(consent.__dict__)
    return consent


def _expiry(text: str | None) -> str | None:
    from datetime import datetime, timezone

    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise IdentityError(f"--expires: not an ISO 8601 date or time: {text!r} (e.g. 2027-06-30)")
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    if when <= datetime.now(timezone.utc):
        raise IdentityError(f"--expires: {text} is in the past")
    return when.isoformat(timespec="seconds")


def cmd_bench_live(args) -> int:
    from server.bench import command as bench_live
    return bench_live.run(args)


def cmd_enroll(args) -> int:
    from engines.neural.enroll import enroll
    from engines.provenance.watermark import Marker, Payload

    from server.audit import AuditLog, audit_path, local_user

    consent = _consent(args)
    consent.check("enrollment")  # before minutes of training, not after
    log = AuditLog(audit_path(args.home), "avatar enroll")
    try:
        with log.use("enroll", local_user(), args.name, address="local") as use:
            identity, summary = enroll(store(args), args.video, args.name, consent, args.display_name,
                                       preset=args.preset, steps=args.steps, max_frames=args.max_frames,
                                       overwrite=args.overwrite, fresh=args.fresh,
                                       bf16=False if args.no_bf16 else None, device=args.device,
                                       resolution=args.resolution, marker=Marker(Payload.here(use.id)))
    finally:
        log.close()
    print(json.dumps(summary, indent=2))
    print(f"enrolled neural identity {identity.name!r} in {identity.path}"
          + (f" (evaluation: {identity.path / 'eval.html'})" if summary.get("eval") else ""))
    return 0


def cmd_eval(args) -> int:
    from engines.neural.evaluate import evaluate_identity, write_report
    from engines.provenance.watermark import Marker, Payload
    from server.audit import AuditLog, audit_path, local_user
    from server.config import check_output_size

    if args.driving is not None and not args.driving.is_file():
        raise IdentityError(f"{args.driving}: no such file")
    identity = store(args).load(args.name)
    identity.consent.check("offline-render")  # the report shows rendered frames of the person
    if args.output_size is not None:
        check_output_size(args.output_size)
        identity = identity.at_most(args.output_size)
    # It renders the person offline: on record as a render, its report's frames marked.
    log = AuditLog(audit_path(args.home), "avatar eval")
    try:
        with log.use("render", local_user(), identity.name, address="local") as use:
            marker = Marker(Payload.here(use.id))
            report = evaluate_identity(identity, args.driving, args.max_frames, args.backend,
                                       identity_distance=not args.no_identity_distance, marker=marker)
            use.frames = report["frames"]
    finally:
        log.close()
    print(f"watermark on the report's rendered frames: {marker.payload} (`avatar audit --id {use.id[:8]}`)")
    base = args.output or Path(f"eval-{identity.name}")
    json_path, html_path = base.with_name(base.name + ".json"), base.with_name(base.name + ".html")
    engines = "neural vs warp" if identity.engine == "neural" else f"{identity.engine} engine"
    write_report(report, json_path, html_path, f"{identity.name}: {engines}")
    print(json.dumps(report["summary"], indent=2))
    print(f"report written to {json_path} and {html_path}")
    return 0


def cmd_bench_engines(args) -> int:
    from engines.bench import bench_engines, format_table

    identity = store(args).load(args.identity)
    if args.driving is not None:
        from engines.video import read_video
        frames = list(read_video(args.driving, 60))
    else:
        frames = [identity.reference]
    report = bench_engines(identity, frames, n=args.n)
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written to {args.json}")
    return 0


def cmd_export_trt(args) -> int:
    from engines.neural import tensorrt_build
    return tensorrt_build.run(args)


def cmd_identity_list(args) -> int:
    s = store(args)
    s.ensure_default()
    for name in s.names():
        try:
            ident = s.load(name)
            print(f"{name:<24}{ident.engine:<8}{ident.display_name}")
        except IdentityError as e:
            print(f"{name:<24}{'BROKEN':<8}{e}")
    return 0


def cmd_identity_show(args) -> int:
    print(json.dumps(store(args).load(args.name).manifest, indent=2))
    return 0


def cmd_identity_revoke(args) -> int:
    consent = store(args).revoke(args.name, args.by, args.reason)
    print(f"consent for identity {args.name!r} revoked at {consent.revoked_at}; a running server ends "
          "its live sessions within a second")
    return 0


def cmd_identity_style(args) -> int:
    s = store(args)
    if s.load(args.name).engine != "neural":
        identity = s.style(args.name, args.style, args.new_name, args.display_name, args.overwrite)
        print(f"created identity {identity.name!r} ({args.style} {args.name!r}) in {identity.path}")
        return 0
    from engines.neural.enroll import restyle
    from engines.provenance.watermark import Marker, Payload

    from server.audit import AuditLog, audit_path, local_user

    # An enrolled identity learns the look from its own scan again: an enrollment on record.
    log = AuditLog(audit_path(args.home), "avatar identity style")
    try:
        with log.use("enroll", local_user(), args.new_name, address="local") as use:
            identity, summary = restyle(s, args.name, args.style, args.new_name, args.display_name, args.overwrite,
                                        preset=args.preset, steps=args.steps, marker=Marker(Payload.here(use.id)))
    finally:
        log.close()
    print(json.dumps(summary, indent=2))
    print(f"created neural identity {identity.name!r} ({args.style} {args.name!r}, trained on its restyled "
          f"self-scan) in {identity.path}")
    return 0


def cmd_identity_label(args) -> int:
    store(args).set_label(args.name, args.state == "on")
    print(f"identity {args.name!r}: visible badge {args.state} for viewers and renders")
    return 0


def cmd_identity_delete(args) -> int:
    store(args).delete(args.name)
    print(f"deleted identity {args.name!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
