// Streaming avatar web client: camera -> WebRTC -> server -> avatar video back.
// Signaling protocol v1 (docs/PROTOCOL.md) over a WebSocket on the same host and port.
"use strict";

// Errors after which reconnecting cannot help: the user has to change something.
const FINAL_ERRORS = new Set(["unauthorized", "forbidden", "forbidden_identity", "unknown_identity", "bad_value",
  "bad_version", "room_busy"]);

// Exposed for tests and debugging (window.avatar).
const state = {
  wanted: false,        // the user pressed Start and not Stop
  ws: null, pc: null, camera: null,
  session: null, retryDelay: 1000, retryTimer: null, pingTimer: null,
  url: null, redirects: 0,  // the cluster node a "redirect" sent this page to, and how many in a row
  statsCount: 0, lastStats: null, lastError: null,
};
window.avatar = state;

// ---- start / stop --------------------------------------------------------------------
async function start() {
  state.wanted = true;
  $("start").disabled = true;
  $("stop").disabled = false;
  if (!state.camera) {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      fail("This page needs a secure context (https or localhost) to use the camera.");
      return;
    }
    say(room() ? "Asking for the camera and microphone…" : "Asking for the camera…");
    try {
      // The microphone only when presenting in a room: its viewers hear it, the server nothing else.
      state.camera = await navigator.mediaDevices.getUserMedia({
        video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } }, audio: !!room() });
    } catch (e) {
      const denied = e.name === "NotAllowedError" || e.name === "SecurityError";
      fail(denied ? "Camera (or microphone) access was denied. Allow it for this site and press Start again."
        : e.name === "NotFoundError" ? "No camera was found." : `Cannot open the camera: ${e.message}`);
      return;
    }
    $("camera").srcObject = state.camera;
  }
  connect();
}

function stop() {
  state.wanted = false;
  clearTimeout(state.retryTimer);
  send({ type: "bye" });
  teardown();
  if (state.camera) state.camera.getTracks().forEach((t) => t.stop());
  state.camera = null;
  $("camera").srcObject = null;
  $("start").disabled = false;
  $("stop").disabled = true;
  say("Stopped.");
}

function fail(text) {
  state.wanted = false;
  teardown();
  $("start").disabled = false;
  $("stop").disabled = true;
  say(text, "error");
}

function teardown() {
  clearInterval(state.pingTimer);
  if (state.pc) state.pc.close();
  if (state.ws) { state.ws.onclose = null; state.ws.close(); }
  state.pc = state.ws = state.session = null;
  $("avatar").srcObject = null;
  $("share").hidden = true;
  setSessionControls(false);
}

// Presenting in a room: the link viewers open (no token in it; a viewer brings their own).
function showShareLink(name) {
  if (!name) return;
  const url = `${location.origin}/viewer.html?room=${encodeURIComponent(name)}`;
  $("viewer-link").href = $("viewer-link").textContent = url;
  $("share").hidden = false;
}

function scheduleReconnect(why) {
  teardown();
  state.url = null;  // start over at the page's own server: it places the presenter again
  state.redirects = 0;
  if (!state.wanted) return;
  const delay = state.retryDelay;
  state.retryDelay = Math.min(state.retryDelay * 2, 15000);
  say(`${why} Reconnecting in ${Math.round(delay / 1000)} s…`, "warn");
  state.retryTimer = setTimeout(connect, delay);
}

// ---- signaling -----------------------------------------------------------------------
function token() {
  return $("token").value.trim() || undefined;
}

function room() {
  return $("room").value.trim() || undefined;
}

function connect() {
  const ws = new WebSocket(state.url || signalingUrl());
  state.ws = ws;
  say("Connecting…");
  ws.onopen = () => send({ type: "hello", token: token(), identity: $("identity").value || "demo", room: room() });
  ws.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch { return; }
    onMessage(msg).catch((e) => scheduleReconnect(`Error: ${e.message}.`));
  };
  ws.onclose = () => { if (state.ws === ws) scheduleReconnect("Lost the connection to the server."); };
}

function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ v: 1, ...msg }));
}

async function onMessage(msg) {
  switch (msg.type) {
    case "session":
      state.session = msg;
      state.redirects = 0;
      fillIdentities(msg.identities, msg.identity);
      showShareLink(msg.room);
      await negotiate();
      break;
    case "answer":
      await state.pc.setRemoteDescription({ type: "answer", sdp: msg.sdp });
      break;
    case "redirect": {  // placed on another node of the cluster
      const url = redirectTarget(msg, state);
      teardown();
      state.url = url;
      if (!url) scheduleReconnect("Sent from server to server too often.");
      else { say("Moving to another server of the cluster…"); connect(); }
      break;
    }
    case "control_ok":
      $("pause").textContent = msg.paused ? "Resume" : "Pause";
      setVoiceOnly(!!msg.voice_only);
      break;
    case "error":
      onError(msg);
      break;
  }
}

function onError(msg) {
  state.lastError = msg;
  if (msg.code === "busy") {
    scheduleReconnect("The server is busy (all session slots are taken).");
  } else if (FINAL_ERRORS.has(msg.code)) {
    fail(msg.code === "unauthorized" ? "The server did not accept the token." : `Refused: ${msg.message}`);
  } else if (msg.code === "session_ended" || msg.code === "timeout") {
    scheduleReconnect(`The session ended (${msg.message}).`);
  } else if (msg.code === "server_draining") {  // this server stops: connect again, to be placed elsewhere
    state.retryDelay = 500;
    scheduleReconnect("This server is stopping; reconnecting.");
  } else {
    say(`Server says: ${msg.message} (${msg.code})`, "warn");
  }
}

async function negotiate() {
  const pc = new RTCPeerConnection();
  state.pc = pc;
  // Camera, and the microphone when there is one (presenting in a room).
  state.camera.getTracks().forEach((t) => pc.addTrack(t, state.camera));
  // The client creates the "stats" channel so it is part of the single offer.
  const stats = pc.createDataChannel("stats");
  stats.onmessage = (ev) => showStats(JSON.parse(ev.data));
  pc.ontrack = (ev) => {
    lowestPlayoutDelay(ev.receiver);
    if (ev.track.kind === "video") $("avatar").srcObject = new MediaStream([ev.track]);
  };
  pc.onconnectionstatechange = () => {
    if (pc !== state.pc) return;
    if (pc.connectionState === "connected") {
      state.retryDelay = 1000;
      say(`Streaming as “${state.session.identity}”.`, "ok");
      setSessionControls(true);
      if ($("voice-only").checked) send({ type: "control", voice_only: true });  // kept across a reconnect
    } else if (pc.connectionState === "failed") {
      scheduleReconnect("The media connection failed.");
    }
  };
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc);
  send({ type: "offer", sdp: pc.localDescription.sdp });
  clearInterval(state.pingTimer);
  state.pingTimer = setInterval(() => send({ type: "ping" }), 10000);
}

// ---- controls ------------------------------------------------------------------------
function setSessionControls(on) {
  ["recalibrate", "pause"].forEach((id) => { $(id).disabled = !on; });
  $("voice-only").disabled = !on || !room();  // the voice reaches the server only in a room
}

// Voice only: the camera stops sending (its track is disabled: no picture leaves this page),
// and the server drives the face from the microphone until it is switched back.
function setVoiceOnly(on) {
  $("voice-only").checked = on;
  if (state.camera) state.camera.getVideoTracks().forEach((t) => { t.enabled = !on; });
}

function fillIdentities(names, current) {
  const select = $("identity");
  select.replaceChildren(...names.map((n) => new Option(n, n, false, n === current)));
}

let sliderTimer = null;
function sendGains() {
  clearTimeout(sliderTimer);
  // Debounced: a dragged slider would otherwise hit the message rate limit.
  sliderTimer = setTimeout(() => send({
    type: "control",
    expression_gain: Number($("expression-gain").value),
    head_gain: Number($("head-gain").value),
    freeze_head: $("freeze-head").checked,
  }), 100);
}

for (const id of ["expression-gain", "head-gain"]) {
  $(id).addEventListener("input", () => {
    $(`${id}-value`).textContent = Number($(id).value).toFixed(2);
    sendGains();
  });
}
$("freeze-head").addEventListener("change", sendGains);
$("recalibrate").addEventListener("click", () => send({ type: "control", recalibrate: true }));
$("pause").addEventListener("click", () => send({ type: "control", pause: $("pause").textContent === "Pause" }));
$("voice-only").addEventListener("change", () => send({ type: "control", voice_only: $("voice-only").checked }));
$("identity").addEventListener("change", () => send({ type: "control", identity: $("identity").value }));
$("connect-form").addEventListener("submit", (ev) => { ev.preventDefault(); start(); });
$("stop").addEventListener("click", stop);
$("copy-link").addEventListener("click", () => navigator.clipboard.writeText($("viewer-link").href)
  .then(() => say("Viewer link copied.", "ok"), () => say("Copy the link by hand: the clipboard is not available.", "warn")));

// ---- stats overlay -------------------------------------------------------------------
function showStats(s) {
  if (s.type !== "stats") return;
  state.statsCount += 1;
  state.lastStats = s;
  const lat = s.latency_ms;
  $("stats-summary").textContent =
    `${s.fps} fps · latency p50 ${lat.p50.toFixed(0)} ms / p95 ${lat.p95.toFixed(0)} ms · dropped ${s.dropped}` +
    (s.face ? "" : " · no face");
  // The server names its stages, in order, in the session message.
  const stages = (state.session && state.session.stages) || Object.keys(s.stages_ms);
  const max = Math.max(1, ...stages.map((k) => s.stages_ms[k].p95));
  $("stats-bars").replaceChildren(...stages.map((k) => {
    const row = document.createElement("div");
    row.className = "bar";
    const name = document.createElement("span");
    name.textContent = `${k} ${s.stages_ms[k].p50.toFixed(1)}`;
    const bar = document.createElement("i");
    bar.style.width = `${(100 * s.stages_ms[k].p50) / max}px`;
    row.append(name, bar);
    return row;
  }));
  if (state.pc && state.pc.connectionState === "connected") {
    if (!s.face && s.frames > 0) say("No face found: look into the camera, with your face well lit.", "warn");
    else if (s.paused) say("Paused.", "info");
    else say(`Streaming as “${s.identity}”.`, "ok");
  }
}

// ---- page setup ----------------------------------------------------------------------
(function init() {
  const params = new URLSearchParams(location.search);
  if (params.get("token")) $("token").value = params.get("token");
  if (params.get("room")) $("room").value = params.get("room");
  fetch("/identities", { headers: token() ? { Authorization: `Bearer ${token()}` } : {} })
    .then((r) => (r.ok ? r.json() : null))
    .then((body) => { if (body) fillIdentities(body.identities, params.get("identity") || "demo"); })
    .catch(() => {});
  if (params.get("autostart") === "1") start();
})();
