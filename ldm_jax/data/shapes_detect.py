"""A detector for the `shapes` dataset: grades whether generated samples follow their prompts.

Pipeline, for an image of shapes on white:
1. when the image is noisy (estimated from a median-filter residual), denoise it with a 3x3 median;
2. per pixel, explain the image as a blend of white and one palette colour: with ink d = 255 - rgb
   and ink_k = 255 - palette_k, the blend weight is alpha_k = clip(d . ink_k / |ink_k|^2, 0, 1);
   the pixel takes the colour with the smallest residual |d - alpha_k ink_k| and is foreground when
   alpha_k >= 0.5. In "ink" space the blurred rim of a red shape stays red (pink is red at
   alpha ~ 0.5), where nearest-RGB matching would call it orange;
3. per colour, a morphological opening removes speckle; connected components above a minimum area
   are the objects, and the anchor nearest to a component's box centre is its position;
4. the shape comes from cumulants of the object's soft coverage, which a Gaussian blur leaves
   unchanged from the third order on: an upward triangle is skewed (its mass sits low), and a
   square's 4th cumulant along the axes is twice that along the diagonals, while a disc's is the
   same in every direction. Fill ratios (0.785 / 1.0 / 0.5) are exact on clean renders but drift
   with blur; the cumulants do not.
"""

import re
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ldm_jax.data import shapes as shapes_lib

_INK = 255.0 - shapes_lib.PALETTE.astype(np.float64)  # [6, 3]
_CAPTION_RE = re.compile(
    r"a (" + "|".join(shapes_lib.COLOR_NAMES) + r") (" + "|".join(shapes_lib.SHAPES) + r") at the ("
    + "|".join(shapes_lib.POSITION_NAMES) + r")")


def _classify_pixels(image: np.ndarray, alpha_threshold: float) -> np.ndarray:
  """Palette index per pixel, or -1 for background: int [H, W]."""
  d = 255.0 - image.astype(np.float64)  # [H, W, 3]
  norms = (_INK ** 2).sum(-1)  # [6]
  alpha = np.clip(np.einsum("hwc,kc->hwk", d, _INK) / norms, 0.0, 1.0)  # [H, W, 6]
  resid = np.linalg.norm(d[:, :, None, :] - alpha[..., None] * _INK, axis=-1)  # [H, W, 6]
  best = resid.argmin(-1)  # [H, W]
  best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]  # [H, W]
  return np.where(best_alpha >= alpha_threshold, best, -1)


def _cumulants(weights: np.ndarray, coords: np.ndarray) -> tuple[float, float, float]:
  """Mass, 3rd and 4th cumulants of the 1-D distribution of `coords` weighted by `weights`."""
  m = weights.sum()
  mu = (weights * coords).sum() / m
  c = coords - mu
  var = (weights * c ** 2).sum() / m
  k3 = (weights * c ** 3).sum() / m
  k4 = (weights * c ** 4).sum() / m - 3 * var ** 2
  return m, k3, k4


def _shape_of(soft: np.ndarray) -> int:
  """Shape index from the soft coverage `soft` [h, w] of one object (zero outside it).

  Uses cumulants, which a Gaussian blur leaves unchanged from the 3rd order on (the blur's own
  cumulants of order >= 3 are zero) and which do not depend on where the object is:
  - an upward triangle has its mass skewed downwards: k3 of y ~ -0.021 A^1.5 (A = area), versus 0
    for disc and square;
  - a square's 4th cumulant along the axes is twice that along the diagonals (uniform vs
    triangular marginals); a disc's is the same in every direction.
  """
  h, w = soft.shape
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)  # [h, w] each
  area, k3_y, k4_y = _cumulants(soft, yy)
  _, _, k4_x = _cumulants(soft, xx)
  _, _, k4_d1 = _cumulants(soft, (xx + yy) / np.sqrt(2))
  _, _, k4_d2 = _cumulants(soft, (xx - yy) / np.sqrt(2))
  # Pixel rows grow downwards, so a triangle pointing up (wide at the bottom) has its long tail
  # towards small y: negative skew.
  if k3_y / max(area, 1.0) ** 1.5 < -0.0105:
    return 2
  axis, diag = (k4_x + k4_y) / 2, (k4_d1 + k4_d2) / 2
  return 1 if axis < 1.5 * diag else 0  # both are negative: "twice as negative" is the square


def noise_level(image: np.ndarray) -> float:
  """Robust estimate of the pixel noise std (0-255 scale): MAD of the residual of a 3x3 median."""
  med = ndimage.median_filter(image, size=(3, 3, 1), mode="nearest")
  resid = image.astype(np.int16) - med.astype(np.int16)
  return float(1.4826 * np.median(np.abs(resid)))


def detect_shapes(image: np.ndarray, min_area_frac: float = 0.006, alpha_threshold: float = 0.5,
                  denoise: bool | None = None) -> list[dict[str, Any]]:
  """Finds the coloured shapes in an image of the shapes dataset.

  Args:
    image: uint8 [H, W, 3] (float images in [-1, 1] or [0, 1] are not accepted: convert first).
    min_area_frac: components smaller than this fraction of the image are ignored. The smallest
      spec object (triangle of r = 0.12) covers 2.9% of the image.
    alpha_threshold: blend weight above which a pixel is foreground.
    denoise: segment a 3x3-median-filtered copy; None decides from the estimated noise level, as
      the median also clips the corners of clean small shapes.

  Returns:
    A list (largest first) of dicts: color (str), shape (str), position (str), box (x0, y0, x1, y1)
    in [0, 1], area (fraction of the image).
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image of shape {image.shape} and dtype {image.dtype}; expected uint8 "
                     "[H, W, 3] (convert [-1, 1] samples with ldm_jax.data.transforms.to_uint8)")
  h, w, _ = image.shape
  if denoise is None:
    denoise = noise_level(image) > 2.0
  segment = ndimage.median_filter(image, size=(3, 3, 1), mode="nearest") if denoise else image
  classes = _classify_pixels(segment, alpha_threshold)  # [H, W]
  ink = 255.0 - segment.astype(np.float64)  # [H, W, 3]
  min_area = min_area_frac * h * w
  components = []  # (colour, bool mask [H, W])
  for k in range(len(shapes_lib.COLORS)):
    mask = classes == k
    if mask.sum() < min_area:
      continue
    opened = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
    labelled, n = ndimage.label(opened)
    for comp in range(1, n + 1):
      comp_mask = labelled == comp
      if comp_mask.sum() >= min_area:
        # Give back the thin parts (a triangle's apex) that the opening removed.
        comp_mask = mask & ndimage.binary_dilation(comp_mask, iterations=2)
        components.append((k, comp_mask))
  occupied = np.zeros((h, w), bool)
  for _, m in components:
    occupied |= m
  pad = max(3, int(round(0.06 * max(h, w))))  # room for the blurred rim around the mask
  anchors = np.array([p for _, p in shapes_lib.POSITIONS])  # [5, 2]
  found = []
  for k, comp_mask in components:
    ys, xs = np.nonzero(comp_mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
    pos = int(np.argmin(((anchors - [cx, cy]) ** 2).sum(-1)))
    # Soft coverage of colour k in a padded window, with every other object's pixels (and their
    # rims) removed. Negative values are kept so that background noise averages out.
    others = ndimage.binary_dilation(occupied & ~comp_mask, iterations=2)
    wy0, wy1 = max(0, y0 - pad), min(h, y1 + pad)
    wx0, wx1 = max(0, x0 - pad), min(w, x1 + pad)
    soft = ink[wy0:wy1, wx0:wx1] @ _INK[k] / (_INK[k] ** 2).sum()  # [h', w']
    soft = np.where(others[wy0:wy1, wx0:wx1], 0.0, np.minimum(soft, 1.0))
    found.append({
        "color": shapes_lib.COLOR_NAMES[k],
        "shape": shapes_lib.SHAPES[_shape_of(soft)],
        "position": shapes_lib.POSITION_NAMES[pos],
        "box": (x0 / w, y0 / h, x1 / w, y1 / h),
        "area": comp_mask.sum() / float(h * w),
    })
  found.sort(key=lambda o: -o["area"])
  return found


def parse_caption(caption: str) -> list[tuple[str, str, str]]:
  """The (color, shape, position) triples named by a shapes caption, in order."""
  triples = _CAPTION_RE.findall(caption)
  if not triples:
    raise ValueError(f"caption {caption!r} names no object; expected e.g. "
                     "'a red circle at the top left'")
  return [tuple(t) for t in triples]


def sample_matches(image: np.ndarray, caption: str, strict: bool = True, **detect_kw) -> bool:
  """Whether the objects detected in `image` are those the caption asks for.

  strict: the detected (color, shape, position) multiset must equal the caption's; otherwise every
  requested object must be present and extra objects are allowed.
  """
  want = sorted(parse_caption(caption))
  got = sorted((o["color"], o["shape"], o["position"]) for o in detect_shapes(image, **detect_kw))
  if strict:
    return got == want
  remaining = list(got)
  for t in want:
    if t not in remaining:
      return False
    remaining.remove(t)
  return True


def match_rate(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str],
               strict: bool = True, **detect_kw) -> float:
  """Fraction of samples whose detected objects match their caption (see `sample_matches`).

  images: uint8 [N, H, W, 3] (or a sequence of [H, W, 3]); captions: N strings.
  """
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions; expected equal counts")
  if len(images) == 0:
    raise ValueError("match_rate needs at least one image")
  hits = [sample_matches(im, c, strict=strict, **detect_kw) for im, c in zip(images, captions)]
  return float(np.mean(hits))
