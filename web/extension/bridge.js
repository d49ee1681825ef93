// Avatar camera, the content script in the extension's isolated world: relays the page
// script's two requests (start with an SDP offer, stop) to the service worker and its replies
// back. The page never gets the token or the server's URL: only the identity's name (for the
// device label) and the SDP answer.
"use strict";
(() => {
  const CHANNEL = "avatar-camera";
  const target = location.origin === "null" ? "*" : location.origin;
  const toPage = (msg) => window.postMessage({ channel: CHANNEL, to: "page", ...msg }, target);

  chrome.runtime.sendMessage({ type: "config" })
    .then((config) => config && toPage({ type: "config", identity: config.identity }))
    .catch(() => {});

  window.addEventListener("message", (event) => {
    const m = event.data;
    if (event.source !== window || !m || m.channel !== CHANNEL || m.to !== "extension") return;
    const wellFormed = typeof m.id === "string" && m.id.length <= 64 &&
      (m.type === "stop" || (m.type === "start" && typeof m.sdp === "string" && m.sdp.length <= 32768));
    if (!wellFormed) return;
    chrome.runtime.sendMessage({ type: m.type, id: m.id, sdp: m.sdp })
      .catch((e) => ({ error: String((e && e.message) || e) }))
      .then((reply) => toPage({ type: `${m.type}-reply`, id: m.id, sdp: reply && reply.sdp,
                                error: reply ? reply.error : "the extension did not answer" }));
  });
})();
