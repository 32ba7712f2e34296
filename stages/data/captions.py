"""Captions for digit images, from the label and attributes measured on the pixels (numpy
only, deterministic): "a thick handwritten seven, slanted left", "a handwritten one".

- stroke width: ink area over half its boundary length (ink: pixels >= 0.5; for a stroke
  of width w and length L >> w that is about w), compared with the median of the digit's
  class: below ``THIN`` times it "thin", above ``THICK`` times it "thick", else no word;
- slant: the shear of the ink's second moments, s = -cov(col, row) / var(row) (rows grow
  downwards, so s > 0 when the top leans right): above ``RIGHT`` "slanted right", below
  ``LEFT`` "slanted left", else no word (MNIST digits lean right a little on average:
  median s ~ 0.13).

Few words, so a word-level tokenizer covers every caption: ``WORDS``.
"""

from __future__ import annotations

import numpy as np

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = ("a", "thin", "thick", "handwritten", *DIGITS, "slanted", "left", "right", ",")
THIN, THICK = 0.85, 1.2        # stroke width over the class median
LEFT, RIGHT = -0.15, 0.3       # slant thresholds


def _plane(image) -> np.ndarray:
    a = np.asarray(image, dtype=np.float64)
    return a.reshape(a.shape[-2], a.shape[-1])


def stroke_width(image) -> float:
    """Ink area / (boundary edges / 2), in pixels; 0 for a blank image."""
    ink = _plane(image) >= 0.5
    area = ink.sum()
    if not area:
        return 0.0
    pad = np.pad(ink, 1)
    inner = pad[1:-1, 1:-1]
    edges = sum((inner & ~np.roll(pad, s, axis=a)[1:-1, 1:-1]).sum()
                for a in (0, 1) for s in (1, -1))
    return float(2 * area / edges)


def slant(image) -> float:
    """-cov(col, row) / var(row) of the ink (pixel values as weights); 0 for a blank image."""
    x = _plane(image)
    mass = x.sum()
    if mass <= 0:
        return 0.0
    r, c = np.mgrid[:x.shape[0], :x.shape[1]]
    dr, dc = r - (x * r).sum() / mass, c - (x * c).sum() / mass
    var = (x * dr * dr).sum() / mass
    return float(-(x * dr * dc).sum() / mass / var) if var > 0 else 0.0


def class_stats(images, labels) -> dict[int, float]:
    """The median stroke width of each label's images: what ``caption`` compares with."""
    widths = np.array([stroke_width(im) for im in images])
    labels = np.asarray(labels)
    return {int(k): float(np.median(widths[labels == k])) for k in np.unique(labels)}


def caption(image, label: int, class_stats: dict[int, float]) -> str:
    """The caption of one image (values in [0, 1], shape (28, 28) or (1, 28, 28)) of digit
    ``label``; ``class_stats``: the median stroke width per label (``class_stats()``)."""
    words = ["a"]
    median = class_stats.get(int(label), 0.0)
    if median > 0:
        ratio = stroke_width(image) / median
        if ratio < THIN:
            words.append("thin")
        elif ratio > THICK:
            words.append("thick")
    words += ["handwritten", DIGITS[int(label)]]
    s = slant(image)
    text = " ".join(words)
    if s < LEFT:
        text += ", slanted left"
    elif s > RIGHT:
        text += ", slanted right"
    return text
