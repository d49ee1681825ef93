"""The voice drives the face: speech (synthesized or recorded) to phonemes with timings, visemes, and
per-frame target landmarks for the renderer. Pure compute; imports engines/ only, never server/."""
