"""Similarity transforms (scale, rotation, translation) as 4x4 homogeneous matrices."""
from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares M with dst ~= M(src) (Umeyama 1991). src, dst: (N, D), D = 2 or 3."""
    d = src.shape[1]
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    flip = np.eye(d)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        flip[-1, -1] = -1
    rot = u @ flip @ vt
    var = (s0 ** 2).sum() / len(src)
    scale = float(np.trace(np.diag(sig) @ flip) / max(var, 1e-12))
    m = np.eye(d + 1)
    m[:d, :d] = scale * rot
    m[:d, d] = mu_d - scale * rot @ mu_s
    return m


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    d = m.shape[0] - 1
    return (pts @ m[:d, :d].T + m[:d, d]).astype(pts.dtype, copy=False)


def decompose(m: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Scale, rotation and translation of a 3-D similarity matrix."""
    lin = m[:3, :3]
    scale = float(np.cbrt(np.linalg.det(lin)))
    return scale, lin / scale, m[:3, 3].copy()


def turn_degrees(m: np.ndarray) -> float:
    """How far a 3-D similarity turns the image plane's normal: yaw and pitch together, not roll."""
    _, rot, _ = decompose(m)
    return float(np.degrees(np.arccos(np.clip(rot[2, 2], -1.0, 1.0))))


def compose(scale: float, rot: np.ndarray, trans: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = scale * rot
    m[:3, 3] = trans
    return m


def scale_motion(m: np.ndarray, center: np.ndarray, gain: float) -> np.ndarray:
    """The motion m, made `gain` times as strong, about `center`.

    m is written as x -> s R (x - c) + c + t; the result is s**g R**g (x - c) + c + g t,
    so gain 0 is no motion, 1 is m itself and 2 doubles the turn, nod and shift.
    """
    scale, rot, _ = decompose(m)
    t = apply(m, center[None])[0] - center
    rotvec = Rotation.from_matrix(rot).as_rotvec() * gain
    rot_g = Rotation.from_rotvec(rotvec).as_matrix()
    s_g = scale ** gain
    return compose(s_g, rot_g, center + gain * t - s_g * rot_g @ center)
