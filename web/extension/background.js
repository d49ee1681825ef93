// Avatar camera, the service worker: the extension's only network side. It holds the settings
// (server, token, identity, room), publishes the page's camera offer to the server over WHIP
// (RFC 9725) and ends that session again. Nothing is sent before a page picks the camera.
"use strict";

const DEFAULTS = fetch(chrome.runtime.getURL("config.json"))
  .then((r) => (r.ok ? r.json() : {}))
  .catch(() => ({}));

async function settings() {
  const stored = await chrome.storage.local.get(["server", "token", "identity", "room"]);
  const chosen = Object.fromEntries(Object.entries(stored).filter(([, v]) => typeof v === "string" && v !== ""));
  return { ...(await DEFAULTS), ...chosen };
}

const CALL_FRAME = "1280x720"; // page.js's FRAME

function whipUrl(s) {
  const base = s.server.endsWith("/") ? s.server : `${s.server}/`;
  // WHIP needs a room: without one of yours, a private one nobody else knows.
  const room = s.room || `cam-${crypto.randomUUID().slice(0, 12)}`;
  const url = new URL(`whip/${encodeURIComponent(room)}`, base);
  if (s.identity) url.searchParams.set("identity", s.identity);
  // A call's camera-shaped picture: the server pastes the avatar back into the identity's
  // own photo (or centres it with plain sides, for an identity without one).
  url.searchParams.set("frame", CALL_FRAME);
  return url;
}

const auth = (token) => (token ? { Authorization: `Bearer ${token}` } : {});

async function start(key, sdp) {
  const s = await settings();
  if (!s.server) throw new Error("Avatar camera: set the avatar server in the extension's options");
  const url = whipUrl(s);
  const response = await fetch(url, {
    method: "POST", body: sdp, headers: { "Content-Type": "application/sdp", ...auth(s.token) },
  });
  const body = await response.text();
  if (response.status !== 201) {
    throw new Error(`the avatar server said ${response.status}: ${body.trim().slice(0, 200)}`);
  }
  const resource = new URL(response.headers.get("Location"), url).href;
  // The worker may be stopped between start and stop: keep what stop needs in session storage.
  await chrome.storage.session.set({ [key]: { resource, token: s.token || "" } });
  return { sdp: body };
}

async function stop(key) {
  const { [key]: made } = await chrome.storage.session.get(key);
  if (!made) return {};
  await chrome.storage.session.remove(key);
  await fetch(made.resource, { method: "DELETE", headers: auth(made.token) }).catch(() => {});
  return {};
}

async function handle(msg, sender) {
  const key = `whip:${sender.tab ? sender.tab.id : "-"}:${sender.frameId}:${msg.id}`;
  if (msg.type === "config") {
    const s = await settings();
    return { identity: s.identity || "demo" };
  }
  if (msg.type === "start") return start(key, msg.sdp);
  if (msg.type === "stop") return stop(key);
  return { error: "unknown request" };
}

chrome.runtime.onMessage.addListener((msg, sender, reply) => {
  handle(msg, sender).then(reply, (e) => reply({ error: String((e && e.message) || e) }));
  return true; // the reply comes asynchronously
});
