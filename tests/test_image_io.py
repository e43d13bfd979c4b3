"""utils/image_io.load_rgb: every image kind a WIDER-like dataset may hold, and clear errors."""
import pickle

import numpy as np
import pytest
from PIL import Image

from utils.files.image_io import ImageReadError, load_rgb


def _pattern():
    """RGB uint8 [48, 64, 3]: red left third, green middle, blue right, a gradient below."""
    img = np.zeros((48, 64, 3), dtype=np.uint8)
    img[:24, :21] = (220, 20, 30)
    img[:24, 21:42] = (20, 200, 40)
    img[:24, 42:] = (30, 40, 210)
    img[24:] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None]
    return img


def test_jpeg_is_returned_in_rgb_order(tmp_path):
    path = tmp_path / 'rgb.jpg'
    Image.fromarray(_pattern()).save(path, quality=95)
    out = load_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3) and out.flags['C_CONTIGUOUS']
    assert np.abs(out[5, 5].astype(int) - (220, 20, 30)).max() <= 6
    assert np.abs(out[5, 60].astype(int) - (30, 40, 210)).max() <= 6


def test_png_is_exact(tmp_path):
    path = tmp_path / 'rgb.png'
    Image.fromarray(_pattern()).save(path)
    np.testing.assert_array_equal(load_rgb(str(path)), _pattern())


@pytest.mark.parametrize('ext', ['jpg', 'png'])
def test_grayscale_becomes_three_equal_channels(tmp_path, ext):
    path = tmp_path / f'gray.{ext}'
    gray = Image.fromarray(_pattern()).convert('L')
    gray.save(path)
    out = load_rgb(path)
    assert out.shape == (48, 64, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert np.abs(out[..., 0].astype(int) - np.asarray(gray, dtype=int)).max() <= 4


def test_png_with_alpha_drops_alpha(tmp_path):
    rgba = np.dstack([_pattern(), np.full((48, 64), 7, dtype=np.uint8)])
    path = tmp_path / 'alpha.png'
    Image.fromarray(rgba, mode='RGBA').save(path)
    out = load_rgb(path)
    np.testing.assert_array_equal(out, _pattern())  # colours kept, not blended with the alpha


def test_cmyk_jpeg_is_converted(tmp_path):
    path = tmp_path / 'cmyk.jpg'
    Image.fromarray(_pattern()).convert('CMYK').save(path, quality=95)
    assert Image.open(path).mode == 'CMYK'
    out = load_rgb(path)
    assert out.shape == (48, 64, 3)
    assert np.abs(out[5, 5].astype(int) - (220, 20, 30)).max() <= 8
    assert np.abs(out[5, 30].astype(int) - (20, 200, 40)).max() <= 8


def test_pillow_fallback_reads_what_opencv_cannot(tmp_path):
    path = tmp_path / 'pattern.tga'  # OpenCV has no TGA decoder
    Image.fromarray(_pattern()).save(path)
    np.testing.assert_array_equal(load_rgb(path), _pattern())


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize('kind', ['missing', 'empty', 'truncated', 'garbage', 'directory'])
def test_unreadable_files_raise_one_line_error_naming_the_file(tmp_path, kind):
    good = tmp_path / 'good.jpg'
    Image.fromarray(_pattern()).save(good, quality=90)
    path = {
        'missing': tmp_path / 'nope.jpg',
        'empty': _write(tmp_path / 'empty.jpg', b''),
        'truncated': _write(tmp_path / 'cut.jpg', good.read_bytes()[:300]),
        'garbage': _write(tmp_path / 'text.jpg', b'this is not an image\n' * 20),
        'directory': tmp_path,
    }[kind]
    with pytest.raises(ImageReadError) as info:
        load_rgb(path)
    err = info.value
    assert isinstance(err, OSError) and isinstance(err, ValueError)
    assert str(path) in str(err) and '\n' not in str(err)
    assert err.path == str(path)
    copy = pickle.loads(pickle.dumps(err))  # crosses DataLoader worker boundaries intact
    assert str(copy) == str(err)
    if kind == 'garbage':  # no Python object address in the message
        assert str(err).endswith('not a decodable image (neither OpenCV nor Pillow knows its format)')


@pytest.mark.parametrize('decoder', ['opencv', 'pillow'])
def test_exif_orientation_is_ignored_unless_asked_for(tmp_path, monkeypatch, decoder):
    """Boxes are given on the stored pixel grid: a rotated-by-EXIF JPEG must not be turned
    by one decoder and left by the other. demo.py asks for the upright view."""
    import utils.files.image_io as image_io
    if decoder == 'pillow':
        monkeypatch.setattr(image_io, '_decode_opencv', lambda data, exif_orientation: None)
    path = tmp_path / 'rotated.jpg'
    im = Image.fromarray(_pattern())
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(path, quality=95, exif=exif.tobytes())
    stored = load_rgb(path)
    assert stored.shape == (48, 64, 3)
    assert np.abs(stored[5, 5].astype(int) - (220, 20, 30)).max() <= 8
    upright = load_rgb(path, exif_orientation=True)
    assert upright.shape == (64, 48, 3)
    # Turned clockwise: the stored top-left (red) is now the top-right corner.
    assert np.abs(upright[5, 42].astype(int) - (220, 20, 30)).max() <= 8
    assert np.abs(upright.astype(int) - np.rot90(stored, k=-1).astype(int)).max() <= 1
