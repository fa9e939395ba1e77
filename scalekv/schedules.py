"""Scale schedules: the :class:`Scale` record every model and cache share, and Infinity's 15 aspect templates at
0.06M / 0.25M / 0.60M / 1M pixels.

A schedule is the list of token-map sizes ``(h, w)`` one image goes through, from ``1x1`` to the last map; the
image is ``16 * h_last`` by ``16 * w_last`` pixels (the VAE stride; the 8B model's patchify VAE works on a grid twice
as fine, see :attr:`ScaleSchedule.vae_sizes`). The official tables define 8 templates with ``h >= w`` and derive the
transposed ones; a template is named by its ``h / w`` truncated to three decimals (0.333, 0.4, ..., 3.0), exactly the
keys the reference uses. The 2-D RoPE of every scale is laid onto the grid of the template's 1M map, so a schedule
also carries that extent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    """One step of a next-scale schedule: the token map of side ``h`` x ``w`` that starts at ``start``."""

    index: int
    h: int
    w: int
    start: int
    is_last: bool

    @property
    def length(self) -> int:
        """Tokens in this scale's map."""
        return self.h * self.w

    @property
    def end(self) -> int:
        """Tokens of this and all earlier scales (the uncompressed prefix after this scale)."""
        return self.start + self.length


def make_scales(sizes: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> tuple[Scale, ...]:
    """Turn a schedule of ``(h, w)`` map sizes into :class:`Scale` records."""
    scales, start = [], 0
    for i, (h, w) in enumerate(sizes):
        if h < 1 or w < 1:
            raise ValueError(f"scale {i} has size {h}x{w}; expected positive sides")
        scales.append(Scale(i, int(h), int(w), start, i == len(sizes) - 1))
        start += h * w
    return tuple(scales)


VAE_STRIDE = 16  # pixels per token of the transformer grid

# the 13 map sizes (h, w) of every h >= w template, coarse to fine (official `dynamic_resolution.py`)
_TALL_TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: (
        (1, 1),
        (2, 2),
        (4, 4),
        (6, 6),
        (8, 8),
        (12, 12),
        (16, 16),
        (20, 20),
        (24, 24),
        (32, 32),
        (40, 40),
        (48, 48),
        (64, 64),
    ),
    1.250: (
        (1, 1),
        (2, 2),
        (3, 3),
        (5, 4),
        (10, 8),
        (15, 12),
        (20, 16),
        (25, 20),
        (30, 24),
        (35, 28),
        (45, 36),
        (55, 44),
        (70, 56),
    ),
    1.333: (
        (1, 1),
        (2, 2),
        (4, 3),
        (8, 6),
        (12, 9),
        (16, 12),
        (20, 15),
        (24, 18),
        (28, 21),
        (36, 27),
        (48, 36),
        (60, 45),
        (72, 54),
    ),
    1.500: (
        (1, 1),
        (2, 2),
        (3, 2),
        (6, 4),
        (9, 6),
        (15, 10),
        (21, 14),
        (27, 18),
        (33, 22),
        (39, 26),
        (48, 32),
        (63, 42),
        (78, 52),
    ),
    1.750: (
        (1, 1),
        (2, 2),
        (3, 3),
        (7, 4),
        (11, 6),
        (14, 8),
        (21, 12),
        (28, 16),
        (35, 20),
        (42, 24),
        (56, 32),
        (70, 40),
        (84, 48),
    ),
    2.000: (
        (1, 1),
        (2, 2),
        (4, 2),
        (6, 3),
        (10, 5),
        (16, 8),
        (22, 11),
        (30, 15),
        (38, 19),
        (46, 23),
        (60, 30),
        (74, 37),
        (90, 45),
    ),
    2.500: (
        (1, 1),
        (2, 2),
        (5, 2),
        (10, 4),
        (15, 6),
        (20, 8),
        (25, 10),
        (30, 12),
        (40, 16),
        (50, 20),
        (65, 26),
        (80, 32),
        (100, 40),
    ),
    3.000: (
        (1, 1),
        (2, 2),
        (6, 2),
        (9, 3),
        (15, 5),
        (21, 7),
        (27, 9),
        (36, 12),
        (45, 15),
        (54, 18),
        (72, 24),
        (90, 30),
        (111, 37),
    ),
}

# pixel-count name -> number of leading scales of the template
PIXEL_NAMES: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def _all_templates() -> dict[float, tuple[tuple[int, int], ...]]:
    out = {}
    for ratio, sizes in _TALL_TEMPLATES.items():
        out[ratio] = sizes
        if ratio != 1.0:
            # the reference names a transposed template by int(1000 / ratio) / 1000 (0.666, 0.571, 0.333, ...)
            out[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in sizes)
    return dict(sorted(out.items()))


TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = _all_templates()


@dataclass(frozen=True)
class ScaleSchedule:
    """The token maps of one image size: ``sizes[i] = (h_i, w_i)`` on the transformer grid.

    ``template`` is the aspect template (h / w, reference naming), ``pixels`` one of :data:`PIXEL_NAMES`, and
    ``rope_extent`` the ``(h, w)`` of that template's 1M map, onto which every scale's RoPE coordinates are laid.
    """

    template: float
    pixels: str
    sizes: tuple[tuple[int, int], ...]
    rope_extent: tuple[int, int]

    @property
    def scales(self) -> tuple[Scale, ...]:
        return make_scales(self.sizes)

    @property
    def total_tokens(self) -> int:
        return sum(h * w for h, w in self.sizes)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the generated image in pixels."""
        h, w = self.sizes[-1]
        return h * VAE_STRIDE, w * VAE_STRIDE

    def vae_sizes(self, patchify: bool) -> tuple[tuple[int, int], ...]:
        """Map sizes on the VAE latent grid: twice the token grid when the VAE is patchified (8B)."""
        f = 2 if patchify else 1
        return tuple((h * f, w * f) for h, w in self.sizes)


def get_schedule(template: float, pixels: str) -> ScaleSchedule:
    """The schedule of aspect template ``template`` (a key of :data:`TEMPLATES`) at ``pixels`` (e.g. ``"1M"``)."""
    if template not in TEMPLATES:
        raise ValueError(f"aspect template {template!r}: expected one of {list(TEMPLATES)}")
    if pixels not in PIXEL_NAMES:
        raise ValueError(f"pixel count {pixels!r}: expected one of {list(PIXEL_NAMES)}")
    sizes = TEMPLATES[template]
    return ScaleSchedule(template, pixels, sizes[: PIXEL_NAMES[pixels]], sizes[-1])


def nearest_template(h_div_w: float) -> float:
    """The official rule: the template whose ``h / w`` is closest to the requested one."""
    if not isinstance(h_div_w, (int, float)) or not math.isfinite(h_div_w) or h_div_w <= 0:
        raise ValueError(f"aspect ratio h/w={h_div_w!r}: expected a positive finite number")
    return min(TEMPLATES, key=lambda t: abs(t - h_div_w))


def schedule_for_size(height: int, width: int) -> ScaleSchedule:
    """Pick the schedule for a requested image size ``height`` x ``width`` (pixels).

    The aspect template is the nearest by ``h / w`` (the reference's rule); the pixel count is the one of
    0.06M/0.25M/0.60M/1M whose image area is nearest in log-area. The reference supports only template sizes, so the
    returned schedule's :attr:`~ScaleSchedule.image_size` may differ from the request (e.g. 1024x768 gives the 0.75
    template's 1M size, 864x1152); 1024x1024, 512x512 and 256x256 are exact.
    """
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < VAE_STRIDE:
            raise ValueError(f"image {name}={v!r}: expected an integer number of pixels >= {VAE_STRIDE}")
    template = nearest_template(height / width)

    def log_area_gap(pixels: str) -> float:
        h, w = get_schedule(template, pixels).image_size
        return abs(math.log(h * w) - math.log(height * width))

    return get_schedule(template, min(PIXEL_NAMES, key=log_area_gap))


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"WIDTHxHEIGHT"`` (e.g. ``"1024x768"``) into ``(height, width)``."""
    parts = text.lower().split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1024x1024") from None
    return height, width
