// Avatar camera's settings: kept in the extension's own storage (never in a page's), over the
// defaults that `avatar extension` wrote into config.json.
"use strict";
const FIELDS = ["server", "token", "identity", "room"];
const $ = (id) => document.getElementById(id);

async function load() {
  const defaults = await fetch("config.json").then((r) => (r.ok ? r.json() : {})).catch(() => ({}));
  const stored = await chrome.storage.local.get(FIELDS);
  for (const f of FIELDS) $(f).value = stored[f] ?? defaults[f] ?? "";
}

$("settings").addEventListener("submit", async (event) => {
  event.preventDefault();
  let origin;
  try {
    const url = new URL($("server").value);
    if (!["http:", "https:"].includes(url.protocol)) throw new Error();
    origin = `${url.origin}/*`;
  } catch {
    $("status").textContent = "The server must be an http:// or https:// URL.";
    return;
  }
  // The service worker may call only servers the user allowed (asked here, on this click).
  const granted = await chrome.permissions.request({ origins: [origin] }).catch(() => false);
  if (!granted) {
    $("status").textContent = `Not saved: the extension needs your permission to reach ${origin}.`;
    return;
  }
  await chrome.storage.local.set(Object.fromEntries(FIELDS.map((f) => [f, $(f).value.trim()])));
  $("status").textContent = "Saved. Pick \"Avatar camera\" as the camera in your call.";
});

load();
