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
