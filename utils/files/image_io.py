"""Image decoding for every script of the repository.

`load_rgb(path)` returns an 8-bit RGB array [H, W, 3] whatever the file holds: grayscale,
palette, 16-bit, PNG with an alpha channel (alpha dropped, not composited) and CMYK JPEG
are all converted. OpenCV decodes first (fast); Pillow is the fallback for what OpenCV
cannot read. Both return the pixels as stored: an EXIF orientation tag is ignored unless
asked for, because WIDER FACE boxes (and those of any dataset in its format) are given on
the stored pixel grid, as MATLAB's imread reads it. A missing, empty, truncated or otherwise undecodable file raises
`ImageReadError`, whose message is one line naming the file.
"""
import io
import os

import cv2
import numpy as np

from utils.cli import UserError

__all__ = ['ImageReadError', 'load_rgb']


class ImageReadError(UserError, OSError, ValueError):
    """An image file that cannot be decoded. `path` and `reason` are kept as attributes."""

    def __init__(self, path, reason):
        super().__init__(f'cannot read image {path}: {reason}')
        self.path = str(path)
        self.reason = str(reason)

    def __reduce__(self):
        # Rebuild from (path, reason) so the error survives pickling (DataLoader workers).
        return type(self), (self.path, self.reason)


def _decode_opencv(data, exif_orientation):
    """Encoded bytes -> RGB uint8 [H, W, 3], or None when OpenCV cannot decode them."""
    flags = cv2.IMREAD_COLOR if exif_orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        bgr = cv2.imdecode(data, flags)
    except cv2.error:
        return None
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _decode_pillow(data, exif_orientation):
    """Decode encoded bytes with Pillow; returns (RGB uint8 array or None, reason of the failure)."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        return None, 'OpenCV cannot decode it and Pillow is not installed'
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if exif_orientation:
                im = ImageOps.exif_transpose(im)
            rgb = np.asarray(im.convert('RGB'))
    except Image.UnidentifiedImageError:
        return None, 'not a decodable image (neither OpenCV nor Pillow knows its format)'
    except Exception as exc:  # Pillow raises many types for corrupt data
        return None, f'not a decodable image ({type(exc).__name__}: {exc})'.replace('\n', ' ')
    return np.ascontiguousarray(rgb, dtype=np.uint8), ''


def load_rgb(path, exif_orientation=False):
    """Read an image file as RGB.

    Args:
        path: image file (any format OpenCV or Pillow reads).
        exif_orientation: rotate/flip the pixels as the file's EXIF orientation tag says
            (what a photo viewer shows). Off by default: annotations refer to the stored grid.
    Returns:
        np.ndarray uint8 [H, W, 3], RGB channel order, C-contiguous.
    Raises:
        ImageReadError: the file is missing, empty, truncated or not an image.
    """
    path = os.fspath(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageReadError(path, 'no such file') from None
    except IsADirectoryError:
        raise ImageReadError(path, 'is a directory') from None
    except OSError as exc:
        raise ImageReadError(path, exc.strerror or str(exc)) from None
    if data.size == 0:
        raise ImageReadError(path, 'empty file')
    rgb = _decode_opencv(data, exif_orientation)
    if rgb is not None:
        return rgb
    rgb, reason = _decode_pillow(data, exif_orientation)
    if rgb is None:
        raise ImageReadError(path, reason)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) == 0:
        raise ImageReadError(path, f'unexpected decoded shape {rgb.shape}')
    return rgb
