"""`avatar extension`: writes the "Avatar camera" browser extension (web/extension/), ready
configured for one server, as an unpacked folder that Chromium, Chrome or Edge loads
(chrome://extensions, Developer mode, "Load unpacked").

The settings go to the folder's config.json (defaults the options page can change) and the
server's origin into the manifest's host_permissions, so the extension's service worker may
call it. The token, if given, is written there too: the folder is made readable by its owner
only."""
from __future__ import annotations

import json
import os
import shutil
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

from engines.identity import IdentityError, check_name
from .security import check_room

SOURCE = files("server.web").joinpath("extension")
FILES = ("manifest.json", "page.js", "bridge.js", "background.js", "options.html", "options.js")


def server_origin(url: str) -> str:
    """The http(s) origin of `url`, or ValueError saying what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--server must be an http:// or https:// URL, not {url[:100]!r}")
    return f"{parts.scheme}://{parts.netloc}"


def write_extension(out: Path, server: str, token: str | None = None, identity: str | None = None,
                    room: str | None = None) -> Path:
    """The extension written to `out` (created, or a folder this wrote before). ValueError for
    a bad setting or a folder that holds something else."""
    origin = server_origin(server)
    try:
        if identity:
            check_name(identity)
    except IdentityError as e:
        raise ValueError(str(e)) from None
    if room:
        check_room(room)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise ValueError(f"{out} is not empty and holds no extension: pick a new folder")
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    for name in FILES:
        with SOURCE.joinpath(name).open("rb") as src, open(out / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["host_permissions"] = [f"{origin}/*"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    config = {"server": server if server.endswith("/") else server + "/", "token": token or "",
              "identity": identity or "", "room": room or ""}
    fd = os.open(out / "config.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
    return out
