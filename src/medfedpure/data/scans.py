"""One clinical scan file (JPEG/PNG/BMP/TIFF, DICOM, NIfTI) as the array the model sees; each format
is one `ScanReader` in `READERS` (a new format: one `register_reader` call).

`read_scan` returns uint8 (3, size, size) like `decode_image`: photos go through exactly the
training path; DICOM and NIfTI pixels are mapped to 8 bits first, then take the same RGB
conversion and bilinear resize (`_resize`). Sources are a path or (bytes, file name), so the
CLI and an upload service read scans identically. Every failure is a `DataError` naming the file.
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel
import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError

from medfedpure.data.datasets import IMAGE_SUFFIXES, MAX_SCAN_PIXELS, DataError, _check_pixels, _resize, decode_image

MAX_NIFTI_BYTES = 256 * 2**20  # a NIfTI inflated: a 512 x 512 x 400 int16 CT is 200 MB
HEAD_BYTES = 132  # what a reader's `sniff` sees of a file without a known suffix


@dataclass(frozen=True)
class ScanReader:
    """One scan format: the file suffixes it claims, how it knows a file without one by its first
    `HEAD_BYTES` bytes (`sniff`, optional), and `read(data, name, size, geometry, nifti_slice)` -> uint8
    (3, size, size), filling `geometry` with the scan's own width, height and channels."""

    kind: str
    suffixes: tuple[str, ...]
    read: Callable[[bytes, str, int, dict, int | None], np.ndarray]
    sniff: Callable[[bytes], bool] | None = None


READERS: dict[str, ScanReader] = {}  # by kind; `register_reader` adds one (a new format: one reader here)


def register_reader(reader: ScanReader) -> ScanReader:
    taken = [s for s in reader.suffixes if s in _by_suffix()]
    if reader.kind in READERS or taken:
        raise ValueError(f"scan reader '{reader.kind}' clashes with a registered one ({taken or reader.kind})")
    READERS[reader.kind] = reader
    return reader


def _by_suffix() -> dict[str, str]:
    return {s: r.kind for r in READERS.values() for s in r.suffixes}


def scan_suffixes() -> set[str]:
    """Every suffix a registered reader claims."""
    return set(_by_suffix())


def _suffix(name: str) -> str:
    name = name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def scan_kind(name: str, head: bytes | None = None) -> str:
    """'image', 'dicom' or 'nifti' from the file name; a name without a known suffix is DICOM
    if `head` (the file's first bytes) has the 'DICM' magic at byte 128, else a DataError."""
    kind = _by_suffix().get(_suffix(name))
    if kind:
        return kind
    sniffed = [r.kind for r in READERS.values() if head is not None and r.sniff is not None and r.sniff(head)]
    if sniffed:
        return sniffed[0]
    raise DataError(f"scan file '{name}' is not a known scan type "
                    f"(suffixes: {', '.join(sorted(scan_suffixes()))}, or DICOM with a 'DICM' header)")


def read_scan(source: Path | str | bytes, size: int, name: str | None = None,
              nifti_slice: int | None = None, geometry: dict | None = None) -> np.ndarray:
    """uint8 (3, size, size) of one scan. `source` is a path or the file's bytes; bytes need
    `name` (for the kind and error messages). `nifti_slice`: slice of a 3-D NIfTI along its
    last axis (default: the middle one). `geometry`, a dict, receives the scan's own width, height
    and channels before the resize (what `out_of_domain` compares with the hospital's scans)."""
    geometry = {} if geometry is None else geometry
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not name:
            raise DataError("scan bytes need a file name")
        data, path = bytes(source), None
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise DataError(f"scan file '{path}' does not exist or is not a file")
        data = None
    if path is not None and _by_suffix().get(_suffix(name)) == IMAGE:
        image = _not_blank(decode_image(path, size), name)  # the training path, bit for bit
        geometry.update(image_geometry(path))
        return image
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DataError(f"scan file '{path}' cannot be read ({err.strerror or err})") from err
    if not data:
        raise DataError(f"scan file '{name}' is empty (0 bytes)")
    reader = READERS[scan_kind(name, data[:HEAD_BYTES])]
    return _not_blank(reader.read(data, name, size, geometry, nifti_slice), name)


def _geometry(img: Image.Image) -> dict:
    return {"width": img.width, "height": img.height, "channels": len(img.getbands())}


def image_geometry(path: Path | str) -> dict:
    """An image file's width, height and channels from its header (its pixels are not decoded)."""
    with Image.open(path) as img:
        return _geometry(img)


def scan_statistics(x: np.ndarray) -> dict[str, float]:
    """What the out-of-domain check compares, of a uint8 (3, S, S) scan as the model sees it: mean and
    spread of its intensities (0-1), and how colored it is (mean gap between channels, 0-1)."""
    f = x.astype(np.float64) / 255
    color = (np.abs(f[0] - f[1]) + np.abs(f[1] - f[2]) + np.abs(f[0] - f[2])).mean() / 3
    return {"mean": float(f.mean()), "std": float(f.std()), "color": float(color)}


def domain_of(scans: np.ndarray, geometries: list[dict] | None = None) -> dict:
    """The range of each statistic over a hospital's clean scans, widened by a quarter of its span
    on each side (color: up to 0.02 above its largest): what the out-of-domain check accepts.
    `geometries` (the scans' own sizes and channels, before the resize) add the range of their
    sides and the channel counts seen (without them the check has no size or channel part)."""
    stats = [scan_statistics(x) for x in scans]
    out = {"n": len(stats)}
    for key in ("mean", "std"):
        values = [s[key] for s in stats]
        span = max(values) - min(values)
        out[key] = [min(values) - span / 4, max(values) + span / 4]
    out["color"] = [0.0, max(s["color"] for s in stats) + 0.02]
    if geometries:
        out["side"] = [min(min(g["width"], g["height"]) for g in geometries),
                       max(max(g["width"], g["height"]) for g in geometries)]
        out["channels"] = sorted({g["channels"] for g in geometries})
    return out


SIDE_FACTOR = 2  # far: a shorter side under half the hospital's smallest, or a longer one over twice its largest


def out_of_domain(x: np.ndarray, domain: dict | None, geometry: dict | None = None) -> list[str]:
    """Why the scan is far from the hospital's own (empty: it is not, or no domain is known): its
    intensities (of `x`, as the model sees it) and, given its `geometry`, its size and channels."""
    if not domain:
        return []
    stats = scan_statistics(x)
    words = {"mean": "mean intensity", "std": "intensity spread", "color": "color"}
    reasons = [f"{words[k]} {stats[k]:.3f} outside [{lo:.3f}, {hi:.3f}] of the hospital's {domain['n']} clean scans"
               for k, (lo, hi) in ((k, domain[k]) for k in ("mean", "std", "color")) if not lo <= stats[k] <= hi]
    if geometry and domain.get("side"):
        (lo, hi), (w, h) = domain["side"], (geometry["width"], geometry["height"])
        if min(w, h) * SIDE_FACTOR < lo or max(w, h) > hi * SIDE_FACTOR:
            reasons.append(f"size {w} x {h} pixels, far from the hospital's scans ({lo} to {hi} pixels a side)")
    # one channel or three are both a grey scan as the model sees it (color is judged above); another
    # count (an alpha channel, two, four) the hospital's files never had is named
    if geometry and domain.get("channels") and geometry["channels"] not in {1, 3, *domain["channels"]}:
        seen = " or ".join(str(c) for c in domain["channels"])
        reasons.append(f"{geometry['channels']} channel(s), where the hospital's scans have {seen}")
    return reasons


def _not_blank(x: np.ndarray, name: str) -> np.ndarray:
    """A scan with every pixel the same (blank, or all NaN turned black) is not answered."""
    if x.size and int(x.max()) == int(x.min()):
        raise DataError(f"scan '{name}' is blank (every pixel {int(x.min())}): nothing to classify")
    return x


def _image_from_bytes(data: bytes, name: str, size: int, geometry: dict) -> np.ndarray:
    """`decode_image` for bytes: same decoding, same errors."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_pixels(img, name)
            geometry.update(_geometry(img))
            return _resize(img, size)
    except Image.DecompressionBombError as err:
        raise DataError(f"image file '{name}' is too large to decode safely ({err})") from err
    except UnidentifiedImageError as err:
        raise DataError(f"image file '{name}' cannot be read as an image (not a format it recognizes)") from err
    except (OSError, ValueError) as err:
        raise DataError(f"image file '{name}' cannot be read as an image ({err})") from err


def _unit_range(x: np.ndarray) -> np.ndarray:
    """x scaled so its min..max is 0..1; a constant image gives zeros."""
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def _first(value) -> float:
    """A DICOM number that may be multi-valued (WindowCenter/Width): its first value."""
    return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)


def _dicom_image(data: bytes, name: str) -> Image.Image:
    """8-bit 'L' or 'RGB' image of a single-frame DICOM: Modality LUT (rescale slope/intercept),
    then the linear VOI window if the file has one (PS3.3 C.11.2.1.2), else min..max;
    MONOCHROME1 inverted."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except Exception as err:  # pydicom raises many kinds (InvalidDicomError, EOFError, ValueError, ...)
        raise DataError(f"DICOM file '{name}' cannot be read ({err})") from err
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DataError(f"DICOM file '{name}' is a multi-frame DICOM ({frames} frames); give one 2-D image")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"DICOM file '{name}' has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as err:  # truncated data, missing codec, inconsistent header, ...
        raise DataError(f"DICOM file '{name}': pixel data cannot be decoded ({err})") from err
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if arr.ndim == 3 and arr.shape[-1] == 3:  # RGB (pydicom converts YBR to RGB)
        rgb = arr if arr.dtype == np.uint8 else _to_uint8(_unit_range(arr.astype(np.float64)))
        return Image.fromarray(np.ascontiguousarray(rgb))
    if arr.ndim != 2 or not photometric.startswith("MONOCHROME"):
        raise DataError(f"DICOM file '{name}' is not a 2-D grayscale or RGB image "
                        f"(shape {arr.shape}, {photometric or 'no photometric interpretation'})")
    x = arr.astype(np.float64)
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        x = x * float(ds.get("RescaleSlope") or 1.0) + float(ds.get("RescaleIntercept") or 0.0)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center not in (None, "") and width not in (None, ""):
        c, w = _first(center), _first(width)
        if w <= 1:
            x = (x > c - 0.5).astype(np.float64)
        else:
            x = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    else:
        x = _unit_range(x)
    if photometric == "MONOCHROME1":
        x = 1.0 - x
    return Image.fromarray(_to_uint8(x))


def _nifti_image(data: bytes, name: str, nifti_slice: int | None) -> Image.Image:
    """8-bit 'L' image of a 2-D NIfTI or one slice of a 3-D one (min..max scaled). Shown as
    `np.rot90(slice)`: the first voxel axis runs left to right and the second bottom to top,
    so an axial slice stored in the usual RAS or LAS order appears upright. The affine is not
    used: left/right follow the voxel order (RAS shows neurological, LAS radiological)."""
    try:
        if _suffix(name) == ".nii.gz":
            data = _gunzip_bounded(data, name)
        img = nibabel.Nifti1Image.from_bytes(data)
    except DataError:
        raise
    except Exception as err:  # gzip, zlib and nibabel (WrapStructError, HeaderDataError, ...) errors
        raise DataError(f"NIfTI file '{name}' cannot be read ({err})") from err
    shape = list(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) > 3:
        raise DataError(f"NIfTI file '{name}' is a {len(shape)}-D NIfTI (shape {tuple(img.shape)}); "
                        "give a 2-D image or a 3-D volume")
    if len(shape) < 2:
        raise DataError(f"NIfTI file '{name}' holds {len(shape)}-D data (shape {tuple(img.shape)})")
    if shape[0] * shape[1] > MAX_SCAN_PIXELS:
        raise DataError(f"NIfTI file '{name}': slices of {shape[0]} x {shape[1]} voxels, more than the "
                        f"{MAX_SCAN_PIXELS:,} a scan may have")
    k = None
    if len(shape) == 3:
        k = shape[2] // 2 if nifti_slice is None else nifti_slice
        if not 0 <= k < shape[2]:
            raise DataError(f"NIfTI file '{name}': slice {k} is out of range (0..{shape[2] - 1})")
    try:  # the one slice only: memory bounded by a slice, not the volume
        data_obj = img.dataobj
        vol = np.asarray(data_obj[:, :, k] if k is not None else data_obj[...], dtype=np.float64).reshape(shape[:2])
    except Exception as err:  # truncated data (OSError), unsupported data type, ...
        raise DataError(f"NIfTI file '{name}': voxel data cannot be read ({err})") from err
    if not np.isfinite(vol).all():
        raise DataError(f"NIfTI file '{name}': the slice holds NaN or infinite voxels")
    return Image.fromarray(np.ascontiguousarray(np.rot90(_to_uint8(_unit_range(vol)))))


def _gunzip_bounded(data: bytes, name: str) -> bytes:
    """A .nii.gz inflated no further than its header says it needs, and refused without inflating
    when that passes MAX_NIFTI_BYTES (a 250 KB file can hold 256 MB of zeros)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    head = inflater.decompress(data, 352)
    try:
        header = nibabel.Nifti1Header.from_fileobj(io.BytesIO(head[:348]))
        need = int(header.get_data_offset()) + int(np.prod(header.get_data_shape(), dtype=np.int64)) \
            * header.get_data_dtype().itemsize
    except Exception as err:  # not a NIfTI-1 header: let the reader say so
        raise DataError(f"NIfTI file '{name}' cannot be read ({err})") from err
    if need > MAX_NIFTI_BYTES:
        raise DataError(f"NIfTI file '{name}' inflates to {need:,} bytes, more than the {MAX_NIFTI_BYTES:,} "
                        "a scan may have")
    return head + inflater.decompress(inflater.unconsumed_tail, max(need - len(head), 0))


def _dicom_magic(path: Path) -> bool:
    """Whether a file without a scan suffix is DICOM by its 'DICM' preamble (scanners often write
    files with no suffix at all)."""
    if _suffix(path.name) in scan_suffixes() or not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError:
        return False
    return any(r.sniff is not None and r.sniff(head) for r in READERS.values())


def list_scans(paths: list[Path | str]) -> list[Path]:
    """Scan files from files and folders, in the order given; a folder's scans (sub-folders
    included, hidden ones skipped) sorted. A named file is kept whatever its suffix (`read_scan`
    judges it). A missing path or a folder without scans is a DataError."""
    found: list[Path] = []
    suffixes = scan_suffixes()
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            below = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                below += [Path(dirpath) / f for f in filenames
                          if not f.startswith(".") and (_suffix(f) in suffixes or _dicom_magic(Path(dirpath) / f))]
            if not below:
                raise DataError(f"folder '{p}' holds no scans ({', '.join(sorted(scan_suffixes()))})")
            found += sorted(below)
        elif p.exists():  # a FIFO, a socket, a device: not something to read a scan from
            raise DataError(f"scan path '{p}' is not a regular file or a folder")
        else:
            raise DataError(f"scan path '{p}' does not exist")
    return found


def _decoded(image_of: Callable[[bytes, str, int | None], Image.Image]) -> Callable:
    """A reader's `read` from a function giving the scan as an 8-bit PIL image: its geometry kept,
    then the training path's RGB conversion and bilinear resize."""
    def read(data: bytes, name: str, size: int, geometry: dict, nifti_slice: int | None) -> np.ndarray:
        img = image_of(data, name, nifti_slice)
        geometry.update(_geometry(img))
        return _resize(img, size)
    return read


def _read_image(data: bytes, name: str, size: int, geometry: dict, _: int | None) -> np.ndarray:
    return _image_from_bytes(data, name, size, geometry)


IMAGE = register_reader(ScanReader("image", tuple(sorted(IMAGE_SUFFIXES)), _read_image)).kind
register_reader(ScanReader("dicom", (".dcm", ".dicom"), _decoded(lambda data, name, _: _dicom_image(data, name)),
                           sniff=lambda head: head[128:132] == b"DICM"))
register_reader(ScanReader("nifti", (".nii", ".nii.gz"), _decoded(_nifti_image)))
