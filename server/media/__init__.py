"""Media transport for one session: the marker-bit jitter buffer, VP8 settings, the UDP port
range, frames and tracks, and where the compute runs (stages, the preloaded fork server).
Imports engines/ and server's config and telemetry only: nothing of HTTP, rooms or sessions."""
