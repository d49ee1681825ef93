// Viewer page: watch a room's avatar and hear its presenter. Receive-only WebRTC.
// Signaling protocol v1 (docs/PROTOCOL.md), hello with role "viewer", on the same host and port.
"use strict";

const FINAL_ERRORS = new Set(["unauthorized", "forbidden", "bad_value", "bad_version"]);

// Exposed for tests and debugging (window.viewer).
const state = {
  wanted: false, ws: null, pc: null, room: null, presenter: null,
  retryDelay: 1000, retryTimer: null, pingTimer: null, lastError: null,
  url: null, redirects: 0,  // the cluster node a "redirect" sent this page to (the room's), and how many in a row
};
window.viewer = state;

function watch() {
  state.wanted = true;
  $("watch").disabled = true;
  $("leave").disabled = false;
  connect();
}

function leave() {
  state.wanted = false;
  clearTimeout(state.retryTimer);
  send({ type: "bye" });
  teardown();
  $("watch").disabled = false;
  $("leave").disabled = true;
  say("Left the room.");
}

function fail(text) {
  state.wanted = false;
  teardown();
  $("watch").disabled = false;
  $("leave").disabled = true;
  say(text, "error");
}

function teardown() {
  clearInterval(state.pingTimer);
  if (state.pc) state.pc.close();
  if (state.ws) { state.ws.onclose = null; state.ws.close(); }
  state.pc = state.ws = state.room = null;
  $("stream").srcObject = null;
}

function scheduleReconnect(why) {
  teardown();
  state.url = null;  // start over at the page's own server: it knows where the room is now
  state.redirects = 0;
  if (!state.wanted) return;
  const delay = state.retryDelay;
  state.retryDelay = Math.min(state.retryDelay * 2, 15000);
  say(`${why} Reconnecting in ${Math.round(delay / 1000)} s…`, "warn");
  state.retryTimer = setTimeout(connect, delay);
}

function connect() {
  const ws = new WebSocket(state.url || signalingUrl());
  state.ws = ws;
  say("Connecting…");
  ws.onopen = () => send({ type: "hello", role: "viewer", room: $("room").value.trim(),
    token: $("token").value.trim() || undefined });
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
    case "viewer":
      state.room = msg.room;
      state.redirects = 0;
      showRoom(msg);
      await negotiate();
      break;
    case "redirect": {  // placed on another node of the cluster
      const url = redirectTarget(msg, state);
      teardown();
      state.url = url;
      if (!url) scheduleReconnect("Sent from server to server too often.");
      else { say("Moving to another server of the cluster…"); connect(); }
      break;
    }
    case "room":  // the presenter came or went; media resumes on the same connection
      showRoom(msg);
      break;
    case "answer":
      await state.pc.setRemoteDescription({ type: "answer", sdp: msg.sdp });
      break;
    case "error":
      state.lastError = msg;
      if (msg.code === "busy") scheduleReconnect("The room is full.");
      else if (FINAL_ERRORS.has(msg.code)) {
        fail(msg.code === "unauthorized" ? "The server did not accept the token." : `Refused: ${msg.message}`);
      } else say(`Server says: ${msg.message} (${msg.code})`, "warn");
      break;
  }
}

function showRoom(msg) {
  state.presenter = msg.presenter;
  if (msg.presenter) {
    say(`Live in room “${msg.room}”: ${msg.presenter.identity}.`, "ok");
    $("caption").textContent = `${msg.presenter.identity} — live`;
  } else {
    say(`Waiting for the presenter of room “${msg.room}”… the stream starts by itself.`, "info");
    $("caption").textContent = "No presenter yet";
  }
}

async function negotiate() {
  const pc = new RTCPeerConnection();
  state.pc = pc;
  const stream = new MediaStream();
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  pc.ontrack = (ev) => {
    if (ev.track.kind === "video") lowestPlayoutDelay(ev.receiver);
    stream.addTrack(ev.track);
    if ($("stream").srcObject === stream) return;  // one element source: a new one would abort play()
    $("stream").srcObject = stream;
    $("stream").play().catch((e) => {
      if (e.name !== "NotAllowedError") return;
      // Autoplay with sound needs a click on this page: play muted, offer the click.
      $("stream").muted = true;
      $("unmute").hidden = false;
      $("stream").play().catch(() => {});
    });
  };
  pc.onconnectionstatechange = () => {
    if (pc !== state.pc) return;
    if (pc.connectionState === "connected") state.retryDelay = 1000;
    else if (pc.connectionState === "failed") scheduleReconnect("The media connection failed.");
  };
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc);
  send({ type: "offer", sdp: pc.localDescription.sdp });
  clearInterval(state.pingTimer);
  state.pingTimer = setInterval(() => send({ type: "ping" }), 10000);
}

$("watch-form").addEventListener("submit", (ev) => { ev.preventDefault(); watch(); });
$("leave").addEventListener("click", leave);
$("unmute").addEventListener("click", () => { $("stream").muted = false; $("unmute").hidden = true; });

(function init() {
  const params = new URLSearchParams(location.search);
  if (params.get("room")) $("room").value = params.get("room");
  if (params.get("token")) $("token").value = params.get("token");
  // A shared link (viewer.html?room=NAME) plays at once: muted if the browser demands it,
  // with the unmute button shown. ?autostart=0 waits for Watch.
  if ($("room").value && params.get("autostart") !== "0") watch();
})();
