"""Provenance: the invisible watermark on every synthesized frame, the visible "AI avatar"
badge, `avatar verify`, and signed C2PA manifests on renders. Imports engines.video only."""
