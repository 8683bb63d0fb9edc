"""The scanner's side: one subject's image and label on its acquisition grid.

One sampling per subject composes everything:

    acquisition voxel -> LPS mm -> inverse subject affine -> RAS -> MNI voxel
                      -> + smooth displacement -> sample T1, GM, WM (and head-shell distance)

Thick slices average several sub-samples across the slice; the label is the argmax of the
slab-averaged [background, grey, white] probabilities on the same acquisition grid, so image
and label describe the same partial-volume voxel. Then the profile's contrast curve, bias
field, noise and scanner scale turn signal into scanner units.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from fedmri.common.geometry import LPS_TO_RAS, Volume
from fedmri.deploy.cohort.profiles import ScannerProfile
from fedmri.deploy.cohort.subject import DISP_STEP, SubjectDraw
from fedmri.deploy.cohort.template import DIST_STEP, T1_KNOTS, Template

# Head shell outside the brain, by distance from the brain mask (mm, times the subject's
# shell scale): nothing, CSF rim, skull, scalp, nothing.
_SHELL_MM = (0.0, 0.5, 1.5, 2.5, 3.5, 6.5, 7.5, 12.0, 14.0)


def synthesize(
    profile: ScannerProfile, draw: SubjectDraw, template: Template
) -> tuple[Volume, np.ndarray]:
    """Image (scanner units, float32) and label (uint8) on the subject's acquisition grid."""
    shape = draw.shape
    n = int(np.prod(shape))
    mapping = np.linalg.inv(template.affine_ras) @ LPS_TO_RAS @ draw.inv_affine @ draw.acq_affine
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    centre = mapping[:3, :3] @ idx + mapping[:3, 3:4]
    del idx
    # The displacement is smooth on a scale of centimetres: look it up once per voxel and
    # reuse it for the sub-samples across the slice.
    for k in range(3):
        centre[k] += ndimage.map_coordinates(
            draw.displacement[k], centre / DISP_STEP, order=1, mode="nearest", prefilter=False
        )
    step = mapping[:3, 0:1]  # template voxels per acquisition slice index
    subs = max(1, int(math.ceil(profile.slice_mm / 1.25)))
    offsets = ((np.arange(subs) + 0.5) / subs - 0.5) * (profile.slice_mm / profile.spacing_mm)

    sig = profile.signal
    jit = draw.tissue_jitter
    knots_y = np.array(
        [0.0, sig.csf * jit[0], sig.gm * jit[1], sig.wm * jit[2], sig.wm_hi * jit[2]]
    )
    shell_x = np.array(_SHELL_MM) * draw.shell_scale
    shell_y = np.array(
        [0.0, 0.0, sig.rim, sig.rim, sig.skull, sig.skull, sig.scalp, sig.scalp, 0.0]
    )

    signal = np.zeros(n, dtype=np.float64)
    gm = np.zeros(n, dtype=np.float64)
    wm = np.zeros(n, dtype=np.float64)
    inside = np.zeros(n, dtype=np.float64)
    for off in offsets:
        pts = centre + off * step
        t1 = ndimage.map_coordinates(template.t1, pts, order=1, output=np.float32, prefilter=False)
        gm += ndimage.map_coordinates(template.gm, pts, order=1, output=np.float32, prefilter=False)
        wm += ndimage.map_coordinates(template.wm, pts, order=1, output=np.float32, prefilter=False)
        dist = ndimage.map_coordinates(
            template.dist,
            pts / DIST_STEP,
            order=1,
            output=np.float32,
            mode="constant",
            cval=100.0,
            prefilter=False,
        )
        signal += np.interp(t1, T1_KNOTS, knots_y)
        if profile.skull_stripped:
            inside += dist < 2.0
        else:
            signal += np.interp(dist, shell_x, shell_y)
    signal /= subs
    labels = np.argmax(np.stack([255.0 * subs - gm - wm, gm, wm]), axis=0).astype(np.uint8)

    bias_pts = [
        np.linspace(0.0, b - 1.0, m) for b, m in zip(draw.bias_coarse.shape, shape, strict=True)
    ]
    log_bias = ndimage.map_coordinates(
        draw.bias_coarse,
        np.stack(np.meshgrid(*bias_pts, indexing="ij")).reshape(3, -1),
        order=3,
        mode="nearest",
    )
    image = np.clip(signal, 0.0, None) ** profile.gamma * np.exp(log_bias)
    noise_rng = np.random.default_rng(draw.noise_seed)
    sigma = profile.noise
    if profile.rician:
        image = np.hypot(image + noise_rng.normal(0.0, sigma, n), noise_rng.normal(0.0, sigma, n))
    else:
        image = np.clip(image + noise_rng.normal(0.0, sigma, n), 0.0, None)
    if profile.skull_stripped:
        image *= inside / subs > 0.5
    image *= profile.scale * draw.gain
    return (Volume(image.reshape(shape).astype(np.float32), draw.acq_affine), labels.reshape(shape))
