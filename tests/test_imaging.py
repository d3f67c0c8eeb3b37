"""src.data.imaging: every format decodes to grey float32 in [0, 1] on the right scale; bad files
fail with a message naming the file and the reason."""
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from src.core.errors import DataError
from src.data.imaging import probe_size, read_image, read_image_bytes
from tests.prepare_helpers import png_with_sbit, write_dicom

RAMP8 = np.tile(np.arange(0, 256, 5, dtype=np.uint8), (4, 1))  # 4 x 52


def _save(path, arr, **kw):
    Image.fromarray(arr).save(path, **kw)
    return path


def test_png_8bit_exact_scale(tmp_path):
    img = read_image(_save(tmp_path / "a.png", RAMP8))
    assert img.dtype == np.float32 and img.shape == RAMP8.shape
    np.testing.assert_allclose(img, RAMP8 / 255.0, atol=1e-7)


def test_png_16bit_uses_full_range(tmp_path):
    arr = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    img = read_image(_save(tmp_path / "a16.png", arr))
    np.testing.assert_allclose(img, arr / 65535.0, atol=1e-6)
    assert img.max() == pytest.approx(1.0)


def test_png_16bit_with_sbit_scales_by_significant_bits(tmp_path):
    # 12-bit detector data in a 16-bit PNG: 4095 is white, not 1/16 grey.
    arr = np.array([[0, 2048, 4095]], dtype=np.uint16)
    path = tmp_path / "a12.png"
    path.write_bytes(png_with_sbit(arr, 12))
    np.testing.assert_allclose(read_image(path), arr / 4095.0, atol=1e-6)


def test_rgba_drops_alpha_and_uses_luma(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 100, 50
    rgba[..., 3] = 0  # fully transparent: the grey value must survive
    img = read_image(_save(tmp_path / "rgba.png", rgba))
    expected = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255.0
    np.testing.assert_allclose(img, expected, atol=1e-5)


def test_rgb16_png_keeps_16_bits(tmp_path):
    grey = np.array([[1000, 40000]], dtype=np.uint16)
    bgr = np.stack([grey] * 3, axis=-1)
    ok, buf = cv2.imencode(".png", bgr)
    path = tmp_path / "rgb16.png"
    path.write_bytes(buf.tobytes())
    np.testing.assert_allclose(read_image(path), grey / 65535.0, atol=1e-5)


@pytest.mark.parametrize("ext,kw,tol", [(".jpg", {"quality": 100}, 3 / 255), (".bmp", {}, 1e-7), (".tif", {}, 1e-7)])
def test_other_raster_formats(tmp_path, ext, kw, tol):
    img = read_image(_save(tmp_path / f"x{ext}", RAMP8, **kw))
    np.testing.assert_allclose(img, RAMP8 / 255.0, atol=tol)


def test_tiff_16bit(tmp_path):
    arr = np.array([[0, 65535], [32768, 100]], dtype=np.uint16)
    np.testing.assert_allclose(read_image(_save(tmp_path / "x.tif", arr)), arr / 65535.0, atol=1e-6)


def test_bytes_and_path_agree(tmp_path):
    path = _save(tmp_path / "a.png", RAMP8)
    np.testing.assert_array_equal(read_image_bytes(path.read_bytes(), "upload.png"), read_image(path))


# ------------------------------------------------------------------- bad files
def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png: empty file \(0 bytes\)"):
        read_image(path)


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(0)
    data = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(data, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    with pytest.raises(DataError, match=r"cut\.png: cannot decode PNG: truncated or corrupt file"):
        read_image(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, not pixels")
    with pytest.raises(DataError, match=r"notes\.png: not an image \(unrecognised format"):
        read_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png: image file not found"):
        read_image(tmp_path / "nope.png")


# ------------------------------------------------------------------------ DICOM
def test_dicom_12bit_scaled_by_bits_stored(tmp_path):
    px = np.array([[0, 2048, 4095]], dtype=np.uint16)
    img = read_image(write_dicom(tmp_path / "a.dcm", px, bits_stored=12))
    np.testing.assert_allclose(img, px / 4095.0, atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
    px = np.array([[0, 4095]], dtype=np.uint16)
    img = read_image(write_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1"))
    np.testing.assert_allclose(img, [[1.0, 0.0]], atol=1e-6)


def test_dicom_window_applied_after_rescale(tmp_path):
    # Rescale to "HU-like" values (x - 1000), then window centre 0 width 1001:
    # stored 500 -> -500 (black), 1000 -> 0 (mid grey), 1500 -> 500 (white).
    px = np.array([[500, 1000, 1500]], dtype=np.uint16)
    path = write_dicom(tmp_path / "w.dcm", px, RescaleSlope=1, RescaleIntercept=-1000,
                       WindowCenter=0, WindowWidth=1001)
    np.testing.assert_allclose(read_image(path), [[0.0, 0.5, 1.0]], atol=1e-3)


def test_dicom_bytes_and_no_preamble(tmp_path):
    px = np.array([[0, 1024, 4095]], dtype=np.uint16)
    path = write_dicom(tmp_path / "np.dcm", px, preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    np.testing.assert_allclose(read_image_bytes(path.read_bytes(), "upload.dcm"), px / 4095.0, atol=1e-6)


def test_dicom_without_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "report.dcm", None)
    with pytest.raises(DataError, match=r"report\.dcm: DICOM has no pixel data"):
        read_image(path)


def test_text_named_dcm_is_not_dicom(tmp_path):
    path = tmp_path / "fake.dcm"
    path.write_text("just some text, not a DICOM file at all")
    with pytest.raises(DataError, match=r"fake\.dcm: not a DICOM file"):
        read_image(path)


def test_probe_size_reads_headers_only(tmp_path):
    assert probe_size(_save(tmp_path / "a.png", RAMP8)) == RAMP8.shape
    assert probe_size(write_dicom(tmp_path / "a.dcm", np.zeros((3, 7), np.uint16))) == (3, 7)
    (tmp_path / "z.png").write_bytes(b"")
    assert probe_size(tmp_path / "z.png") is None


def _png_header_only(width: int, height: int) -> bytes:
    """The first bytes of a PNG that declares width x height: what a decompression bomb shows
    before its few KB of zlib data expand to gigabytes."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\0" * 1024)
    return (b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", len(idat)) + b"IDAT" + idat
            + struct.pack(">I", zlib.crc32(b"IDAT" + idat)))


def test_max_pixels_refuses_from_the_header_before_decoding(tmp_path):
    bomb = _png_header_only(13000, 13000)  # 169 MP: 1.7 GB once decoded to float32 grey
    with pytest.raises(DataError, match=r"bomb\.png: 13000x13000 pixels \(169\.0 MP\) exceed data\.max_pixels "
                                        r"\(40\.0 MP\); refused before decoding"):
        read_image_bytes(bomb, "bomb.png", max_pixels=40_000_000)
    # a real image under the limit decodes as before; one over a small limit is refused
    path = tmp_path / "small.png"
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(path)
    assert read_image(path, max_pixels=40_000_000).shape == (40, 60)
    with pytest.raises(DataError, match=r"60x40 pixels .* exceed data\.max_pixels"):
        read_image(path, max_pixels=2000)
    # DICOM: Rows x Columns are checked before the pixel data is touched
    dcm = write_dicom(tmp_path / "big.dcm", np.zeros((40, 60), np.uint16))
    with pytest.raises(DataError, match=r"big\.dcm: 60x40 pixels .* exceed data\.max_pixels"):
        read_image(dcm, max_pixels=2000)

