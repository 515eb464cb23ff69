"""Images: safe loading of any common file, dynamic tiling, normalisation.

    processor = ImageProcessor(tile_size=448, max_tiles=9, mean=..., std=...)
    tiled = processor(load_image("photo.jpg"))   # tiled.pixel_values: (tiles, 3, 448, 448)

Tiling follows InternVL: the grid (cols x rows, min..max tiles) whose aspect ratio is closest
to the image's; the image is resized to fill it and cut into tiles, row by row; a thumbnail of
the whole image is appended when there is more than one tile.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omniforge.errors import EmptyMediaError, MediaTooLargeError, UnreadableMediaError, UnsupportedMediaError
from omniforge.processing.source import media_source

MAX_PIXELS = 64_000_000
"""Largest image accepted (pixels); anything bigger is refused as a likely decompression bomb."""
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def load_image(source, max_pixels: int = MAX_PIXELS):
    """Decode `source` (path, bytes or PIL image) to an RGB PIL image, upright per its EXIF.

    Palette, grayscale, 16-bit, CMYK and alpha images become RGB (alpha over white); an
    animated GIF/WebP gives its first frame. Raises a `MediaError` subclass naming the file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, Image.Image):
        image = source
    else:
        stream = media_source(source, "image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(stream)
        except UnidentifiedImageError:
            raise UnsupportedMediaError(source, "not an image format Pillow can decode") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise MediaTooLargeError(source, "image too large (decompression bomb guard)") from None
        except Exception as e:  # noqa: BLE001  (Pillow raises many types on corrupt headers)
            raise UnreadableMediaError(source, f"corrupt image header ({e})") from None
    width, height = image.size
    if width * height == 0:
        raise EmptyMediaError(source, f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise MediaTooLargeError(source, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    try:
        image.seek(0)
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except Exception as e:  # noqa: BLE001  (truncated or corrupt pixel data surfaces here)
        raise UnreadableMediaError(source, f"corrupt or truncated image data ({e})") from None


def _to_rgb(image):
    from PIL import Image

    if image.mode == "RGB":
        image.load()
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


@functools.lru_cache(maxsize=4096)  # called for every image and tile count; a handful of sizes recur
def choose_grid(width: int, height: int, tile_size: int, min_tiles: int = 1, max_tiles: int = 9) -> tuple[int, int]:
    """(cols, rows) with min..max tiles whose aspect ratio is closest to width/height.

    On a tie the larger grid wins when the image has enough pixels to fill half of it (InternVL).
    """
    aspect = width / height
    grids = sorted({(c, r) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1)
                    if min_tiles <= c * r <= max_tiles}, key=lambda g: g[0] * g[1])
    best, best_diff = grids[0], float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


@dataclass
class TiledImage:
    pixel_values: torch.Tensor
    """(tiles, 3, T, T), normalised; tiles in row order, then the thumbnail if any."""
    grid: tuple[int, int]
    """(cols, rows) of the tile grid."""
    thumbnail: bool
    """Whether the last tile is a thumbnail of the whole image."""

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]


class ImageProcessor:
    """Tiles and normalises images for a vision tower."""

    def __init__(self, tile_size: int, min_tiles: int = 1, max_tiles: int = 9,
                 mean: tuple[float, ...] = SIGLIP_MEAN, std: tuple[float, ...] = SIGLIP_STD):
        self.tile_size, self.min_tiles, self.max_tiles = tile_size, min_tiles, max_tiles
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255

    @classmethod
    def from_tower_folder(cls, folder: str | Path | None, tile_size: int, min_tiles: int = 1,
                          max_tiles: int = 9) -> "ImageProcessor":
        """Normalisation from the tower's own `preprocessor_config.json` (SigLIP's 0.5/0.5 if none)."""
        mean, std = SIGLIP_MEAN, SIGLIP_STD
        file = Path(folder) / "preprocessor_config.json" if folder else None
        if file is not None and file.is_file():
            settings = json.loads(file.read_text())
            mean, std = tuple(settings.get("image_mean", mean)), tuple(settings.get("image_std", std))
        return cls(tile_size, min_tiles, max_tiles, mean, std)

    def grid(self, width: int, height: int, max_tiles: int | None = None) -> tuple[int, int]:
        """(cols, rows) for an image of this size; `max_tiles` overrides the default cap."""
        cap = self.max_tiles if max_tiles is None else max_tiles
        return choose_grid(width, height, self.tile_size, min(self.min_tiles, cap), cap)

    def num_tiles(self, width: int, height: int, max_tiles: int | None = None) -> int:
        """Tiles an image of this size becomes, thumbnail included."""
        cols, rows = self.grid(width, height, max_tiles)
        return cols * rows + (cols * rows > 1)

    def __call__(self, image, max_tiles: int | None = None) -> TiledImage:
        """Tile a PIL RGB image. `max_tiles` overrides the default (1: a single resized tile)."""
        from PIL import Image

        cols, rows = self.grid(*image.size, max_tiles)
        t = self.tile_size
        size = (cols * t, rows * t)
        pixels = _chw(image if image.size == size else image.resize(size, Image.Resampling.BICUBIC))  # (3, rows*t, cols*t)
        tiles = pixels.view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
        thumbnail = rows * cols > 1
        if thumbnail:
            tiles = torch.cat([tiles, _chw(image.resize((t, t), Image.Resampling.BICUBIC))[None]])
        return TiledImage(tiles.float().sub_(self.mean).div_(self.std), (cols, rows), thumbnail)


def _chw(image) -> torch.Tensor:
    """(3, H, W) uint8 view of a PIL RGB image (no float copy until the tiles are cut)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
