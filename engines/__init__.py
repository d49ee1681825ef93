"""Pure compute: frames and landmarks in, frames out. No asyncio, no network, nothing of
WebRTC; never imports server/. Wings: render/ (the warp renderer), neural/ (per-identity
generators), provenance/ (watermark, badge, verify, C2PA); the pipeline's steps at the top."""
