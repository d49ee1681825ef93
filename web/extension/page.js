// Avatar camera, in the page's own world (MAIN): every page sees one more camera,
// "Avatar camera (IDENTITY)". Picking it opens the real default camera, sends it to the avatar
// server (the extension holds the token and makes the request) and hands the page the avatar
// instead, in a 16:9 frame (the server pastes it back into the identity's photo); asked for audio too, the page gets the real microphone delayed by
// the avatar's latency, so lips and voice match in the call. Any other request passes through.
//
// What the page can see: this extra device and the identity's name in its label, the avatar
// track, the SDP offer and answer of the avatar's connection (posted between this script and
// the extension), and what composing each frame cost. Never the token, nor the server's URL.
"use strict";
(() => {
  const md = navigator.mediaDevices;
  if (!md || md.avatarCameraInstalled) return;
  Object.defineProperty(md, "avatarCameraInstalled", { value: true });

  const CHANNEL = "avatar-camera";
  const DEVICE_ID = "avatar-camera";
  const GROUP_ID = "avatar-camera";
  const FRAME = { width: 1280, height: 720, rate: 30 }; // what a call's camera tile expects
  const CODEC_ALLOWANCE = 0.015; // s: the two encodes and decodes the server's figure leaves out
  const realGetUserMedia = md.getUserMedia.bind(md);
  const realEnumerate = md.enumerateDevices.bind(md);
  const target = location.origin === "null" ? "*" : location.origin;
  const waiting = new Map();
  let label = "Avatar camera";
  // What composing the call frame costs, per frame (ms, the last 300): read by `avatar bench in-call`.
  const composeMs = [];
  Object.defineProperty(md, "avatarCameraStats", {
    get: () => ({ frames: composeMs.length, composeMs: composeMs.slice() }),
  });

  window.addEventListener("message", (event) => {
    const m = event.data;
    if (event.source !== window || !m || m.channel !== CHANNEL || m.to !== "page") return;
    if (m.type === "config" && typeof m.identity === "string") label = `Avatar camera (${m.identity})`;
    const done = waiting.get(m.id);
    if (done && typeof m.type === "string" && m.type.endsWith("-reply")) {
      waiting.delete(m.id);
      done(m);
    }
  });

  function ask(type, id, fields = {}) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        waiting.delete(id);
        reject(new DOMException("the Avatar camera extension did not answer", "AbortError"));
      }, 20000);
      waiting.set(id, (m) => {
        clearTimeout(timer);
        if (m.error) reject(new DOMException(`Avatar camera: ${m.error}`, "NotReadableError"));
        else resolve(m);
      });
      window.postMessage({ channel: CHANNEL, to: "extension", type, id, ...fields }, target);
    });
  }

  // ---- the extra device ----------------------------------------------------------------
  function avatarDevice() {
    const proto = (window.InputDeviceInfo || window.MediaDeviceInfo || Object).prototype;
    const plain = () => ({ deviceId: DEVICE_ID, kind: "videoinput", label, groupId: GROUP_ID });
    const device = Object.create(proto);
    for (const [key, value] of Object.entries(plain())) {
      Object.defineProperty(device, key, { value, enumerable: true });
    }
    Object.defineProperty(device, "toJSON", { value: plain });
    Object.defineProperty(device, "getCapabilities", {
      value: () => ({ deviceId: DEVICE_ID, groupId: GROUP_ID, width: { min: 1, max: FRAME.width },
                      height: { min: 1, max: FRAME.height }, frameRate: { min: 1, max: FRAME.rate } }),
    });
    return device;
  }

  md.enumerateDevices = async function enumerateDevices() {
    return [...(await realEnumerate()), avatarDevice()];
  };

  const listOf = (v) => (v === undefined || v === null ? [] : Array.isArray(v) ? v : [v]);

  function wantsAvatar(video) {
    if (!video || typeof video !== "object") return false;
    const id = video.deviceId;
    const ids = id && typeof id === "object" && !Array.isArray(id)
      ? [...listOf(id.exact), ...listOf(id.ideal)] : listOf(id);
    return ids.includes(DEVICE_ID);
  }

  md.getUserMedia = function getUserMedia(constraints) {
    return wantsAvatar(constraints && constraints.video) ? startAvatar(constraints) : realGetUserMedia(constraints);
  };

  // ---- the avatar ------------------------------------------------------------------------
  function gathered(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, 3000); // the server takes an offer without trickle
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
      });
    });
  }

  // The server's avatar drawn, unstretched, into a 16:9 frame: it fills it when the server
  // composed the call frame (the identity's scene, 16:9), a square sits in the middle with
  // plain sides (an older server). Frame by frame, so a call in a background tab is not
  // throttled to a timer's pace.
  function inCallFrame(square) {
    if (typeof MediaStreamTrackProcessor !== "function" || typeof MediaStreamTrackGenerator !== "function") {
      return { track: square, stop: () => {} }; // the square as it is: the call app fits it
    }
    const canvas = new OffscreenCanvas(FRAME.width, FRAME.height);
    const g = canvas.getContext("2d", { alpha: false });
    const generator = new MediaStreamTrackGenerator({ kind: "video" });
    const reader = new MediaStreamTrackProcessor({ track: square }).readable.getReader();
    const writer = generator.writable.getWriter();
    (async () => {
      for (;;) {
        const { value: frame, done } = await reader.read().catch(() => ({ done: true }));
        if (done) break;
        const started = performance.now();
        const k = Math.min(FRAME.width / frame.displayWidth, FRAME.height / frame.displayHeight);
        const w = Math.round(frame.displayWidth * k), h = Math.round(frame.displayHeight * k);
        if (w < FRAME.width || h < FRAME.height) {
          g.fillStyle = "#15181c";
          g.fillRect(0, 0, FRAME.width, FRAME.height);
        }
        g.drawImage(frame, Math.floor((FRAME.width - w) / 2), Math.floor((FRAME.height - h) / 2), w, h);
        const out = new VideoFrame(canvas, { timestamp: frame.timestamp });
        frame.close();
        composeMs.push(performance.now() - started);
        if (composeMs.length > 300) composeMs.shift();
        try { await writer.write(out); } catch { out.close(); break; }
      }
    })();
    return { track: generator, stop: () => { reader.cancel().catch(() => {}); square.stop(); } };
  }

  async function delayedMicrophone(audio) {
    const mic = await realGetUserMedia({ audio });
    const context = new AudioContext();
    context.resume().catch(() => {});
    const delay = context.createDelay(2.0);
    delay.delayTime.value = 0.05; // until the avatar's first latency figure arrives
    const out = context.createMediaStreamDestination();
    context.createMediaStreamSource(mic).connect(delay).connect(out);
    return {
      track: out.stream.getAudioTracks()[0],
      setDelay: (seconds) => delay.delayTime.setTargetAtTime(Math.min(1.5, seconds), context.currentTime, 0.3),
      stop: () => { mic.getTracks().forEach((t) => t.stop()); context.close().catch(() => {}); },
    };
  }

  async function roundTrip(pc) {
    const stats = await pc.getStats().catch(() => null);
    let rtt = 0;
    stats && stats.forEach((s) => {
      if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime) rtt = s.currentRoundTripTime;
    });
    return rtt;
  }

  // What the page's own code reads of the tracks it got: ours, not the generator's.
  function dress(track, extra, onStop) {
    const realStop = track.stop.bind(track);
    const realSettings = track.getSettings.bind(track);
    Object.defineProperty(track, "label", { value: extra.label, configurable: true });
    track.getSettings = () => ({ ...realSettings(), ...extra.settings });
    track.stop = () => { realStop(); onStop(); };
    return track;
  }

  async function startAvatar(constraints) {
    const camera = await realGetUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: FRAME.rate } },
    });
    const id = crypto.randomUUID();
    const pc = new RTCPeerConnection();
    let mic = null;
    let frame = null;
    let ended = false;
    const end = () => {
      if (ended) return;
      ended = true;
      camera.getTracks().forEach((t) => t.stop());
      if (frame) frame.stop();
      if (mic) mic.stop();
      pc.close();
      ask("stop", id).catch(() => {});
    };
    try {
      pc.addTransceiver(camera.getVideoTracks()[0], { direction: "sendrecv" });
      const stats = pc.createDataChannel("stats");
      const square = new Promise((resolve) => {
        pc.addEventListener("track", (e) => { if (e.track.kind === "video") resolve(e.track); });
      });
      await pc.setLocalDescription(await pc.createOffer());
      await gathered(pc);
      const { sdp } = await ask("start", id, { sdp: pc.localDescription.sdp });
      await pc.setRemoteDescription({ type: "answer", sdp });
      frame = inCallFrame(await square);
      const stream = new MediaStream([dress(frame.track, {
        label, settings: { deviceId: DEVICE_ID, groupId: GROUP_ID, width: FRAME.width, height: FRAME.height,
                           frameRate: FRAME.rate, aspectRatio: FRAME.width / FRAME.height },
      }, end)]);
      if (constraints.audio) {
        mic = await delayedMicrophone(constraints.audio);
        stream.addTrack(mic.track);
        // The server reports its share of the avatar's latency; the network and the codecs add the rest.
        stats.addEventListener("message", async (e) => {
          let server;
          try { server = JSON.parse(e.data).latency_ms.p50; } catch { return; }
          if (server > 0) mic.setDelay(server / 1000 + CODEC_ALLOWANCE + (await roundTrip(pc)));
        });
      }
      pc.addEventListener("connectionstatechange", () => {
        if (pc.connectionState === "failed" || pc.connectionState === "closed") end();
      });
      window.addEventListener("pagehide", end);
      return stream;
    } catch (e) {
      end();
      throw e;
    }
  }
})();
