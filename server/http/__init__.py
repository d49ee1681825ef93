"""The front doors: the aiohttp app (pages, health, metrics, identities, rooms), the signaling
WebSocket, WHIP/WHEP and browser enrollment. Parses and checks what clients send, then hands
it to the top-level state; may import server's top level, media, rooms and enroll, never bench."""
