"""``--dataset glyphs``: a many-class benchmark rendered from the fonts matplotlib ships.

Ten digit classes cannot tell apart losses built for thousands of classes (proxy-based ones in
particular). This dataset needs no download: a **class is a printable character** that all 16
DejaVu (Sans, Sans Mono, Serif) and STIX General variants (regular, bold, italic/oblique, bold
italic) draw, about 700 of them (Latin, Greek, Cyrillic, digits, punctuation, symbols); its
**samples are the 16 font variants**, each drawn ``per_font`` times under a seeded random affine
distortion (rotation, scale, shear, shift). Characters that render identically to an earlier one
in every font (Latin ``A`` and Greek ``Α``, ...) are dropped, so no two classes are the same
picture. Classes are shuffled with a fixed RNG and split in two class-disjoint halves (train /
test), the CUB-200 protocol.

Options (``glyphs:key=value,...``):

``classes``   how many characters to keep (default: all that survive deduplication)
``size``      image side in pixels (default 24)
``per_font``  distorted samples per font variant and class (default 2, so 32 samples per class)
``seed``      the dataset's RNG (class subset, split, distortions; default 0: the same data for
              every run seed)

The images are generated once (a few seconds to a minute) and cached as a ``.npz`` under
``$PML_PLUGINS_CACHE`` (default ``~/.cache/pml-plugins``), keyed by the options and the
matplotlib version (the fonts come from it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

#: bump when the rendering changes, so old caches are not reused
GLYPHS_VERSION = 1
#: (file prefix, family) of the 16 variants: 4 DejaVu families x 4 styles; "Display" fonts excluded
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
)
#: two classes whose clean renderings differ by less than this RMS (pixels in [0, 1], over all
#: fonts) count as the same picture; hinting noise between identical outlines is far below it
DUPLICATE_RMS = 0.02
_SUPERSAMPLE = 2  # render and distort at 2x, then average-pool: smoother edges


@dataclass(frozen=True)
class GlyphsOptions:
    """The options of ``glyphs:...``; every one changes the data (and the cache key)."""

    classes: Optional[int] = None
    size: int = 24
    per_font: int = 2
    seed: int = 0

    def key(self) -> str:
        import matplotlib

        payload = json.dumps(
            {**asdict(self), "version": GLYPHS_VERSION, "matplotlib": matplotlib.__version__}, sort_keys=True
        )
        return hashlib.sha1(payload.encode()).hexdigest()[:16]


def parse_glyphs_options(text: Optional[str]) -> GlyphsOptions:
    """``"classes=200,size=32"`` -> :class:`GlyphsOptions`; unknown keys and bad values raise ValueError."""
    values: dict = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in ("classes", "size", "per_font", "seed"):
            raise ValueError(
                f"glyphs options are key=value among classes, size, per_font, seed "
                f"(e.g. 'glyphs:classes=200,size=32'), got {item.strip()!r}"
            )
        try:
            values[key] = int(value)
        except ValueError:
            raise ValueError(f"glyphs option {key} must be an integer, got {value.strip()!r}") from None
    opts = GlyphsOptions(**values)
    if opts.classes is not None and opts.classes < 4:
        raise ValueError(f"glyphs classes must be >= 4 (two per class-disjoint split), got {opts.classes}")
    if not 8 <= opts.size <= 128:
        raise ValueError(f"glyphs size must be between 8 and 128 pixels, got {opts.size}")
    if not 1 <= opts.per_font <= 64:
        raise ValueError(f"glyphs per_font must be between 1 and 64, got {opts.per_font}")
    if opts.seed < 0:
        raise ValueError(f"glyphs seed must be >= 0, got {opts.seed}")
    return opts


def cache_dir() -> Path:
    """``$PML_PLUGINS_CACHE``, else ``~/.cache/pml-plugins``."""
    return Path(os.environ.get("PML_PLUGINS_CACHE") or Path.home() / ".cache" / "pml-plugins")


def font_paths() -> list[str]:
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [root / name for name in FONT_FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the glyphs dataset needs matplotlib's bundled fonts; missing in {root}: {missing}")
    return [str(p) for p in paths]


def shared_characters(paths: list[str]) -> list[str]:
    """Printable characters every font maps: no controls, separators (spaces) or combining marks."""
    from matplotlib import ft2font

    common: Optional[set] = None
    for path in paths:
        charmap = set(ft2font.FT2Font(path).get_charmap())
        common = charmap if common is None else common & charmap
    return [chr(c) for c in sorted(common or ()) if unicodedata.category(chr(c))[0] not in "CZM"]


def render_clean(chars: list[str], paths: list[str], side: int) -> np.ndarray:
    """``(len(chars), len(paths), side, side)`` float32 in [0, 1]: white glyph on black, centred on
    the line's middle (so relative size and height survive: ``.`` stays small, ``'`` stays high)."""
    from PIL import Image, ImageDraw, ImageFont

    out = np.zeros((len(chars), len(paths), side, side), dtype=np.float32)
    for j, path in enumerate(paths):
        font = ImageFont.truetype(path, size=int(round(side * 0.72)))
        for i, ch in enumerate(chars):
            img = Image.new("L", (side, side), 0)
            ImageDraw.Draw(img).text((side / 2, side / 2), ch, fill=255, font=font, anchor="mm")
            out[i, j] = np.asarray(img, dtype=np.float32) / 255.0
    return out


def drop_duplicates(chars: list[str], clean: np.ndarray, rms: float = DUPLICATE_RMS) -> list[int]:
    """Indices of the characters to keep: the first of every group that renders (almost) the same in
    every font, and no blank renderings."""
    flat = torch.as_tensor(clean.reshape(len(chars), -1), dtype=torch.float64)
    n_pix = flat.shape[1]
    sq = (flat * flat).sum(1)
    dist2 = (sq[:, None] + sq[None, :] - 2 * flat @ flat.T).clamp_min(0) / n_pix  # mean squared difference
    same = dist2 < rms * rms
    keep: list[int] = []
    for i in range(len(chars)):
        if flat[i].max() <= 0:  # nothing drawn
            continue
        if not any(bool(same[i, k]) for k in keep):
            keep.append(i)
    return keep


def distort(clean: np.ndarray, per_font: int, size: int, rng: np.random.RandomState) -> np.ndarray:
    """Random affine copies of every rendering: ``(C, F, S2, S2)`` -> ``(C, F * per_font, size, size)``
    uint8. Rotation +-12 degrees, scale 0.85-1.1, shear +-0.2, shift +-8% of the side."""
    c, f, side, _ = clean.shape
    n = c * f * per_font
    angle = np.deg2rad(rng.uniform(-12, 12, n))
    scale = rng.uniform(0.85, 1.1, n)
    shear = rng.uniform(-0.2, 0.2, n)
    shift = rng.uniform(-0.08, 0.08, (n, 2)) * 2  # affine_grid works in [-1, 1]
    cos, sin = np.cos(angle), np.sin(angle)
    # the matrix maps output coordinates to input ones: the inverse of rotate * shear * scale
    rows = [np.stack([cos, -sin + shear * cos], 1), np.stack([sin, cos + shear * sin], 1)]
    a = np.stack(rows, 1) * scale[:, None, None]
    inv = np.linalg.inv(a)
    theta = np.concatenate([inv, -inv @ shift[:, :, None]], axis=2)
    src = torch.as_tensor(clean).repeat_interleave(per_font, dim=1).reshape(n, 1, side, side)
    out = torch.empty(n, 1, size, size)
    for start in range(0, n, 4096):  # bounded memory
        sl = slice(start, start + 4096)
        grid = torch.nn.functional.affine_grid(
            torch.as_tensor(theta[sl], dtype=torch.float32), [len(src[sl]), 1, side, side], align_corners=False
        )
        warped = torch.nn.functional.grid_sample(
            src[sl], grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        out[sl] = torch.nn.functional.adaptive_avg_pool2d(warped, size)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).reshape(c, f * per_font, size, size).numpy()


@functools.lru_cache(maxsize=4)
def distinct_characters(side: int) -> tuple[str, ...]:
    """The shared printable characters minus those rendering like an earlier one at ``side`` pixels."""
    paths = font_paths()
    chars = shared_characters(paths)
    keep = drop_duplicates(chars, render_clean(chars, paths, side))
    return tuple(chars[i] for i in keep)


def generate(opts: GlyphsOptions) -> dict:
    """Render the dataset (no cache): ``images`` (N, S, S) uint8, ``labels`` (N,) class index,
    ``chars`` (C,) the characters, ``train_classes`` / ``test_classes`` class indices."""
    side = opts.size * _SUPERSAMPLE
    chars = list(distinct_characters(side))
    rng = np.random.RandomState(opts.seed)
    order = rng.permutation(len(chars))
    if opts.classes is not None:
        if opts.classes > len(chars):
            raise ValueError(f"glyphs classes={opts.classes}: only {len(chars)} distinct characters are available")
        order = order[: opts.classes]
    order = np.sort(order[: (len(order) + 1) // 2]).tolist() + np.sort(order[(len(order) + 1) // 2 :]).tolist()
    n_train = (len(order) + 1) // 2
    chars = [chars[i] for i in order]
    images = distort(render_clean(chars, font_paths(), side), opts.per_font, opts.size, rng)
    c, per_class = images.shape[:2]
    return {
        "images": images.reshape(c * per_class, opts.size, opts.size),
        "labels": np.repeat(np.arange(c), per_class).astype(np.int64),
        "chars": np.array(chars),
        "train_classes": np.arange(n_train),
        "test_classes": np.arange(n_train, c),
    }


def load_glyphs(opts: GlyphsOptions) -> dict:
    """:func:`generate`, cached on disk (written atomically; a corrupt file is regenerated)."""
    path = cache_dir() / f"glyphs-{opts.key()}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache: render again
    data = generate(opts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **data)
    os.replace(tmp, path)
    return data
