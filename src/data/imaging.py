"""Decode any supported radiograph file into one grey float32 channel in [0, 1].

Every stage that touches an image file (prepare, and the model server on raw uploads)
goes through `read_image`/`read_image_bytes`, so a 16-bit PNG, a windowed DICOM and an
RGBA screenshot of the same radiograph all reach the model on the same scale.

Scaling rules (why they matter: a wrong scale silently shifts every intensity feature):
- integer rasters are divided by their type's full range, except a PNG whose sBIT chunk
  declares fewer significant bits (12-bit detector data in a 16-bit PNG), which is
  divided by 2**sBIT - 1;
- DICOM: modality LUT (rescale), then VOI LUT or window (DICOM PS3.3 C.11.2), else the
  full range of BitsStored mapped through the modality LUT; MONOCHROME1 is inverted;
- float rasters have no intrinsic range: kept if already within [0, 1], else min-max
  scaled (stated in the one place it happens);
- colour -> grey with ITU-R BT.601 luma; alpha is dropped, not composited, because a
  transparent radiograph pixel still carries its grey value.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.core.errors import DataError

DICOM_EXTENSIONS = (".dcm", ".dicom")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """The image at `path` as float32 (H, W) in [0, 1]; DataError naming the file otherwise.
    `max_pixels` (data.max_pixels) refuses a larger image from its header, before decoding."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return read_image_bytes(data, str(path), max_pixels)


def read_image_bytes(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
    """Decode in-memory bytes (an upload, a base64 payload); `name` is used in messages and
    its extension as a hint for DICOM files that lack the 'DICM' preamble."""
    if not data:
        raise DataError(f"{name}: empty file (0 bytes)")
    if is_dicom(data, name):
        img = _decode_dicom(data, name, max_pixels)
    else:
        img = _decode_raster(data, name, max_pixels)
    if img.ndim != 2 or min(img.shape) < 1:
        raise DataError(f"{name}: decoded to shape {img.shape}; expected a 2-D image")
    if not np.isfinite(img).all():
        raise DataError(f"{name}: contains NaN or infinite pixel values")
    return np.ascontiguousarray(np.clip(img, 0.0, 1.0), dtype=np.float32)


def _check_pixels(name: str, width: int, height: int, max_pixels: int | None) -> None:
    """A 164 KB PNG can declare 13000x13000 pixels and decode to 1.7 GB: judge the header first."""
    if max_pixels and width * height > max_pixels:
        raise DataError(f"{name}: {width}x{height} pixels ({width * height / 1e6:.1f} MP) exceed data.max_pixels "
                        f"({max_pixels / 1e6:.1f} MP); refused before decoding (raise data.max_pixels for a "
                        f"genuine radiograph this large)")


def is_dicom(head: bytes, name: str = "") -> bool:
    """DICOM by its Part 10 preamble, or by extension for preamble-less files."""
    return head[128:132] == b"DICM" or Path(name).suffix.lower() in DICOM_EXTENSIONS


# ---------------------------------------------------------------- rasters (Pillow)
def _decode_raster(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning on a huge but genuine radiograph is not an error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
            _check_pixels(name, im.size[0], im.size[1], max_pixels)
            im.load()  # full decode: this is where a truncated file fails
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image (unrecognised format, {len(data)} bytes)") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{name}: image too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason or "broken data stream" in reason:
            reason = f"truncated or corrupt file ({reason})"
        raise DataError(f"{name}: cannot decode {_fmt(data)}: {reason}") from None

    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)  # multi-page TIFF: the first page is the radiograph by convention
    png = _png_header(data)
    if png and png["bit_depth"] == 16 and png["color_type"] in (2, 6):
        # Pillow reduces 16-bit colour PNGs to 8 bits; OpenCV keeps all 16.
        return _grey(_decode_cv2_16bit_colour(data, name), 16)
    mode = im.mode
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
        mode = im.mode
    if mode == "CMYK" or mode == "YCbCr" or mode == "LAB" or mode == "HSV":
        im = im.convert("RGB")
        mode = "RGB"
    arr = np.asarray(im)
    if mode == "1":
        return arr.astype(np.float32)
    if mode in ("L", "LA", "RGB", "RGBA", "RGBX", "RGBa", "La"):
        bits = (png or {}).get("significant_bits") or 8
        return _grey(arr, bits)
    if mode.startswith("I;16") or mode == "I":
        if mode == "I" and arr.max(initial=0) > 65535:
            raise DataError(f"{name}: 32-bit integer pixels above 65535 are not supported")
        bits = (png or {}).get("significant_bits") or 16
        return _grey(arr.astype(np.uint32), bits)
    if mode == "F":
        return _float_to_unit(arr.astype(np.float32))
    raise DataError(f"{name}: unsupported pixel mode {mode!r}")


def _grey(arr: np.ndarray, bits: int) -> np.ndarray:
    """Integer (H, W[, C]) -> grey float32 in [0, 1] using `bits` significant bits."""
    if arr.ndim == 3:
        if arr.shape[2] in (2, 4):  # grey+alpha or RGBA: the alpha channel is dropped
            arr = arr[..., :-1]
        if arr.shape[2] == 1:
            arr = arr[..., 0]
        else:
            arr = arr[..., :3].astype(np.float32) @ _LUMA
    return arr.astype(np.float32) / float(2**bits - 1)


def _float_to_unit(arr: np.ndarray) -> np.ndarray:
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo >= 0.0 and hi <= 1.0:
        return arr
    # No intrinsic range for float data: stretch this image's own range.
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _decode_cv2_16bit_colour(data: bytes, name: str) -> np.ndarray:
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataError(f"{name}: cannot decode 16-bit colour PNG")
    if arr.ndim == 3:  # OpenCV is BGR(A); reorder so the luma weights apply to R, G, B
        arr = arr[..., [2, 1, 0] + ([3] if arr.shape[2] == 4 else [])]
    return arr


def _png_header(data: bytes) -> dict | None:
    """IHDR bit depth / colour type and the sBIT significant bits of a PNG, else None."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    out: dict = {}
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR" and len(body) >= 10:
            out["bit_depth"], out["color_type"] = body[8], body[9]
        elif kind == b"sBIT" and body:
            # One value per channel (alpha excluded for our purposes): use the colour ones.
            sig = max(body[:3]) if out.get("color_type") in (2, 6) else body[0]
            if 0 < sig < out.get("bit_depth", 16):
                out["significant_bits"] = int(sig)
        elif kind in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return out or None


def _fmt(data: bytes) -> str:
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:2] == b"BM":
        return "BMP"
    return "image"


# ---------------------------------------------------------------- DICOM (pydicom)
def _decode_dicom(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi

    forced = data[128:132] != b"DICM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # forced reads of odd files warn per unknown tag
            ds = pydicom.dcmread(io.BytesIO(data), force=forced)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, struct.error) as exc:
        raise DataError(f"{name}: not a readable DICOM file ({str(exc) or type(exc).__name__})") from None
    if forced and not any(k in ds for k in ("SOPClassUID", "Rows", "PixelData")):
        # Without the preamble pydicom parses any bytes as "elements": demand real ones.
        raise DataError(f"{name}: not a DICOM file (no 'DICM' preamble and no DICOM image elements)")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"{name}: DICOM has no pixel data (no PixelData element; a report or structured document?)")
    _check_pixels(name, int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), max_pixels)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types: missing codec, short buffer, bad tags
        raise DataError(f"{name}: DICOM pixel data cannot be decoded ({str(exc).splitlines()[0]})") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]  # multi-frame: the first frame, as for multi-page TIFF
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # pydicom returns colour DICOM as RGB; its bits per sample set the scale.
        return _grey(np.asarray(arr), int(ds.get("BitsStored", 8)))

    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    stored_lo, stored_hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    values = apply_modality_lut(np.asarray(arr), ds).astype(np.float64)

    if ds.get("VOILUTSequence"):
        lut = ds.VOILUTSequence[0]
        out_bits = int(lut.LUTDescriptor[2])
        img = apply_voi(values, ds).astype(np.float64) / float(2**out_bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        img = _window(values, ds, name)
    else:
        ends = apply_modality_lut(np.array([stored_lo, stored_hi]), ds).astype(np.float64)
        lo, hi = float(ends.min()), float(ends.max())
        img = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    img = np.clip(img, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        img = 1.0 - img  # MONOCHROME1: high values are dark
    return img.astype(np.float32)


def _window(values: np.ndarray, ds, name: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2/C.11.2.1.3 windowing, straight to [0, 1] (first window if several)."""
    center, width = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    func = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if func == "SIGMOID":
        if width <= 0:
            raise DataError(f"{name}: DICOM Window Width {width} must be > 0")
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if func == "LINEAR_EXACT":
        if width <= 0:
            raise DataError(f"{name}: DICOM Window Width {width} must be > 0")
        return (values - center) / width + 0.5
    if func != "LINEAR":
        raise DataError(f"{name}: unsupported DICOM VOI LUT Function {func!r}")
    if width < 1:
        raise DataError(f"{name}: DICOM Window Width {width} must be >= 1 for LINEAR windowing")
    if width == 1:
        return (values > center - 0.5).astype(np.float64)
    return (values - (center - 0.5)) / (width - 1) + 0.5


def _first(value) -> float:
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def probe_size(path: str | Path) -> tuple[int, int] | None:
    """(height, width) from the file header without decoding pixels; None if unknown.

    Lets prepare fix the full-mode output size before the single decoding pass."""
    header = probe_header(path)
    return None if header is None else (header.height, header.width)


@dataclass(frozen=True)
class Header:
    height: int
    width: int
    format: str  # PNG, JPEG, TIFF, BMP, DICOM ...
    mode: str    # grey / colour as the file stores it: L, I;16, RGB, RGBA, P; DICOM: MONOCHROME2 ...


def probe_header(path: str | Path) -> Header | None:
    """Size, format and colour mode from the file header, without decoding pixels; None if unknown."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        if is_dicom(head, path.name):
            import pydicom

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=head[128:132] != b"DICM")
            return Header(int(ds.Rows), int(ds.Columns), "DICOM", str(getattr(ds, "PhotometricInterpretation", "?")))
        from PIL import Image

        with Image.open(path) as im:
            return Header(int(im.height), int(im.width), str(im.format or "?"), str(im.mode))
    except Exception:  # any failure here resurfaces, with its reason, when the file is decoded
        return None
