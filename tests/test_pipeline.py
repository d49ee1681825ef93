"""The avatar pipeline's two-thread split (engines/pipeline.py) and the CLI's thread settings."""
import numpy as np

from engines.identity import Consent
from engines.pipeline import AvatarPipeline


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / max(mse, 1e-12))


def test_a_frame_prepared_before_an_identity_change_finishes_as_it_began(store, demo):
    if not store.exists("mirror"):
        store.create(np.ascontiguousarray(demo.reference[:, ::-1]), "mirror",
                     Consent(**demo.manifest["consent"]), "Mirror", source="demo, mirrored")
    mirror = store.load("mirror")
    pipeline = AvatarPipeline(demo)
    try:
        before = pipeline.prepare(demo.neutral)
        pipeline.set_identity(mirror)
        after = pipeline.prepare(mirror.neutral)
        old, new = pipeline.finish(before), pipeline.finish(after)
    finally:
        pipeline.close()
    assert _psnr(old, demo.reference) > 28 and _psnr(new, mirror.reference) > 28
    assert _psnr(old, mirror.reference) < 20


def test_the_cli_runs_numpy_with_one_blas_thread(tmp_path):
    # OpenBLAS's idle worker spins on sched_yield: a fifth of the machine in a live session.
    from threadpoolctl import threadpool_info

    from server.cli import main

    assert main(["--home", str(tmp_path), "identity", "list"]) == 0
    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert blas and all(pool["num_threads"] == 1 for pool in blas)
