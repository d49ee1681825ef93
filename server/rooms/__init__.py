"""Rooms and audiences: a presenter's avatar fanned out to viewers (viewer pages, WHEP
players), the audio held to match the avatar, and publishing into Janus (the SFU and its
HTTP API client). May import server.media and server.security, never http or sessions."""
