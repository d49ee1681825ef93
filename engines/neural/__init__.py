"""The per-identity neural engine: a small CPU-friendly generator that refines the warp
engine's output into the enrolled person's face (see model.py, enroll.py, runtime.py)."""
