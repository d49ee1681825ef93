// Shared by the presenter page (app.js) and the viewer page (viewer.js): small helpers
// around the signaling protocol (docs/PROTOCOL.md) and WebRTC. Loaded before either.
"use strict";

const $ = (id) => document.getElementById(id);

function say(text, kind = "info") {
  const el = $("message");
  el.textContent = text;
  el.className = kind;
}

// The signaling WebSocket on this page's own host and port.
function signalingUrl() {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
}

// A server of a cluster may send the page to another node (docs/CLUSTER.md): {"type": "redirect",
// "url": "wss://node2.example.org/ws?reservation=…"}; the same hello goes there. Only a WebSocket URL
// is followed, at most 3 times in a row; then null, and the page starts over at its own server.
function redirectTarget(msg, state) {
  if (typeof msg.url !== "string" || !/^wss?:\/\//.test(msg.url) || state.redirects >= 3) return null;
  state.redirects += 1;
  return msg.url;
}

// Live, not a film: ask the browser to play each frame as soon as it is decoded rather
// than buffering for smoothness. jitterBufferTarget (ms) is the standard; Chromium also
// knows the older playoutDelayHint (s). Browsers with neither keep their default.
function lowestPlayoutDelay(receiver) {
  try {
    if ("jitterBufferTarget" in receiver) receiver.jitterBufferTarget = 0;
    else if ("playoutDelayHint" in receiver) receiver.playoutDelayHint = 0;
  } catch (e) {
    console.warn("cannot lower the playout delay:", e);
  }
}

// The server does not take trickled candidates: wait for ICE gathering (at most 3 s), then
// send one complete offer.
function iceGathered(pc) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => { if (pc.iceGatheringState === "complete") resolve(); });
    setTimeout(resolve, 3000);
  });
}
