"""Image datasets: Br35H, CIFAR-10 (both layouts), any class-folder set, and a built-in one.

Every loader returns an `ImageSet`: uint8 images (N, 3, S, S) at the working resolution
plus integer labels. Decoding JPEGs is the slow part, so decoded arrays are cached on
disk, keyed by the files' names, sizes and modification times and by the resolution.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from medfedpure.config import DataConfig
from medfedpure.storage import atomic_write_bytes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
BR35H_CLASSES = ("no", "yes")  # label 0 = healthy, 1 = tumor
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file or folder."""


@dataclass
class ImageSet:
    images: np.ndarray  # uint8, (N, 3, S, S)
    labels: np.ndarray  # int64, (N,)
    classes: tuple[str, ...]
    source: str
    # source file of each image, same order; None where images do not come from files
    # (synthetic, CIFAR batch files). Lets `holdout` find the files a run never used.
    paths: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "ImageSet":
        paths = None
        if self.paths is not None:
            paths = tuple(self.paths[i] for i in np.arange(len(self.labels))[idx])
        return ImageSet(self.images[idx], self.labels[idx], self.classes, self.source, paths)


def load_dataset(cfg: DataConfig, seed: int = 0, progress: bool = True) -> ImageSet:
    """The dataset a config names, at its resolution, optionally capped per class (`progress`: a bar
    while images are decoded the first time)."""
    if cfg.dataset == "synthetic":
        data = make_synthetic(cfg.synthetic_per_class, cfg.image_size, seed=seed)
    elif cfg.dataset == "br35h":
        data = load_class_folders(_root(cfg), cfg.image_size, classes=BR35H_CLASSES,
                                  cache_dir=cfg.cache_dir, progress=progress)
    elif cfg.dataset == "cifar10":
        data = load_cifar10(_root(cfg), cfg.image_size, cache_dir=cfg.cache_dir, progress=progress)
    else:
        data = load_class_folders(_root(cfg), cfg.image_size, cache_dir=cfg.cache_dir, progress=progress)
    if cfg.max_per_class:
        data = cap_per_class(data, cfg.max_per_class, seed)
    return data


def files_digest(data: ImageSet) -> str | None:
    """A fingerprint of which files (relative to the data folder) a run used, in order."""
    if data.paths is None:
        return None
    root = Path(data.source)
    h = hashlib.sha256()
    for p in data.paths:
        h.update(os.fsencode(os.path.relpath(p, root)) + b"\n")
    return h.hexdigest()[:16]


def _root(cfg: DataConfig) -> Path:
    root = Path(cfg.root or "").expanduser()
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist or is not a folder")
    return root


def cap_per_class(data: ImageSet, max_per_class: int, seed: int) -> ImageSet:
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(len(data.classes)):
        idx = np.flatnonzero(data.labels == c)
        keep.append(np.sort(rng.permutation(idx)[:max_per_class]))
    return data.subset(np.concatenate(keep))


# --------------------------------------------------------------------------- folders
def _images_below(folder: Path) -> list[Path]:
    """Image files in a class folder and its sub-folders (hidden ones skipped), sorted; a broken
    link or a link loop is named."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                path.stat()
            except OSError as err:
                raise DataError(f"image file '{path}' cannot be opened ({err.strerror or err})") from err
            found.append(path)
    return sorted(found)


def list_class_folders(root: Path, classes: tuple[str, ...] | None = None) -> dict[str, list[Path]]:
    """Image files per class folder (sub-folders included); fails on a missing or empty class folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist or is not a folder")
    if classes is None:
        classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
        if len(classes) < 2:
            raise DataError(f"data folder '{root}' must hold one sub-folder per class "
                            f"(found {len(classes)})")
    files: dict[str, list[Path]] = {}
    for name in classes:
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"class folder '{folder}' is missing (expected classes: {', '.join(classes)})")
        found = _images_below(folder)
        if not found:
            raise DataError(f"class folder '{folder}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files[name] = found
    return files


def load_class_folders(root: Path, image_size: int, classes: tuple[str, ...] | None = None,
                       cache_dir: str | None = None, progress: bool = True) -> ImageSet:
    files = list_class_folders(Path(root), classes)
    names = tuple(files)
    paths = [p for name in names for p in files[name]]
    labels = np.array([i for i, name in enumerate(names) for _ in files[name]], dtype=np.int64)
    images = decode_cached(paths, image_size, cache_dir, progress)
    return ImageSet(images, labels, names, str(root), tuple(str(p) for p in paths))


def load_hospital_folder(folder: Path, image_size: int, classes: tuple[str, ...] | None = None,
                         cache_dir: str | None = None, progress: bool = True) -> ImageSet:
    """One hospital's own class folders. With `classes` (the federation's), the folder must hold
    exactly those classes: a hospital with another class, or without one, would train a different
    task than the others."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"hospital data folder '{folder}' does not exist or is not a folder")
    if classes is not None:
        found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if sorted(classes) != found:
            raise DataError(f"hospital data folder '{folder}' holds class folders [{', '.join(found)}], "
                            f"the federation's classes are [{', '.join(classes)}]")
    return load_class_folders(folder, image_size, classes, cache_dir, progress)


def load_cifar10(root: Path, image_size: int, cache_dir: str | None = None, progress: bool = True) -> ImageSet:
    """CIFAR-10 as torchvision's `cifar-10-batches-py` or as `{train,test}/<class>/*.jpg`.

    Train and test are pooled: clients make their own train/test splits.
    """
    root = Path(root)
    batches = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    if (batches / "data_batch_1").exists():
        return _load_cifar_batches(batches, image_size)
    splits = [root / s for s in ("train", "test") if (root / s).is_dir()]
    if not splits:
        raise DataError(f"'{root}' holds neither cifar-10-batches-py nor train/ and test/ class folders")
    parts = [load_class_folders(s, image_size, CIFAR10_CLASSES, cache_dir, progress) for s in splits]
    return ImageSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                    CIFAR10_CLASSES, str(root), tuple(path for p in parts for path in p.paths or ()))


class _BatchUnpickler(pickle.Unpickler):
    """Reads CIFAR-10's python batches (a dict of bytes, lists and one uint8 array) and nothing
    else: any other object in the file is refused before it is built, so a crafted batch file
    cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing '{module}.{name}': not part of a CIFAR-10 batch")


def _load_cifar_batches(folder: Path, image_size: int) -> ImageSet:
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        path = folder / name
        if not path.exists():
            raise DataError(f"CIFAR-10 batch file '{path}' is missing")
        try:
            with open(path, "rb") as fh:
                batch = _BatchUnpickler(fh, encoding="latin1").load()
            batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
        except Exception as err:  # noqa: BLE001 - any failure here means a bad file
            raise DataError(f"CIFAR-10 batch file '{path}' could not be read ({err})") from err
    data = np.concatenate(images)
    if image_size != 32:
        data = np.stack([_resize(Image.fromarray(x.transpose(1, 2, 0)), image_size) for x in data])
    return ImageSet(data, np.concatenate(labels), CIFAR10_CLASSES, str(folder))


# --------------------------------------------------------------------------- decoding
def _to_8_bit(img: Image.Image) -> Image.Image:
    """Images of more than 8 bits per pixel (16-bit scanner PNGs, 32-bit integer or float TIFFs)
    scaled to 8 bits by the scanner's bit depth, the same for every scan of a kind: 12 bits (4095)
    where no value exceeds 4095 (the usual CT/MR depth, stored in 16-bit files), else 16 bits
    (65535), so a raw value means the same grey in every scan, whatever the scan's own maximum.
    Float, signed or deeper data by its own range."""
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if img.mode == "F" or lo < 0 or hi > 65535:
        scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    else:
        scaled = arr / (4095 if hi <= 4095 else 65535)
    return Image.fromarray(np.round(scaled * 255).clip(0, 255).astype(np.uint8), "L")


def _resize(img: Image.Image, size: int) -> np.ndarray:
    img = ImageOps.exif_transpose(img)  # as a viewer shows it: a camera's or scanner's EXIF orientation applied
    img = _to_8_bit(img).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


MAX_SCAN_PIXELS = 50_000_000  # per 2-D scan: far above any MRI slice, far below what would exhaust memory


def _check_pixels(img: Image.Image, name: str | Path) -> None:
    """Refuse an image by its header, before its pixels are decoded (a 140 KB PNG can hold 144 MP)."""
    width, height = img.size
    if width * height > MAX_SCAN_PIXELS:
        raise DataError(f"image file '{name}' is {width} x {height} pixels, more than the {MAX_SCAN_PIXELS:,} "
                        "a scan may have")


def decode_image(path: Path, size: int) -> np.ndarray:
    if path.stat().st_size == 0:
        raise DataError(f"image file '{path}' is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            _check_pixels(img, path)
            return _resize(img, size)
    except Image.DecompressionBombError as err:
        raise DataError(f"image file '{path}' is too large to decode safely ({err})") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"image file '{path}' cannot be read as an image ({err})") from err


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEDFEDPURE_CACHE", Path.home() / ".cache" / "medfedpure"))


def _cache_key(paths: list[Path], size: int) -> str:
    h = hashlib.sha256(f"v3:{size}".encode())  # v2: EXIF orientation applied; v3: 12- or 16-bit depth
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


def decode_cached(paths: list[Path], size: int, cache_dir: str | None = None, progress: bool = True) -> np.ndarray:
    """Decode and resize images once; later runs read the cached array."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    cache = folder / f"images-{_cache_key(paths, size)}.npy"
    if cache.exists():
        try:
            arr = np.load(cache)
            if arr.shape == (len(paths), 3, size, size):
                return arr
        except (OSError, ValueError):
            log.warning("ignoring unreadable image cache %s", cache)
    arr = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, p in enumerate(tqdm(paths, desc=f"decoding {paths[0].parent.parent.name or 'images'}",
                               unit="img", leave=False, mininterval=1.0, disable=not progress)):
        arr[i] = decode_image(p, size)
    try:
        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_write_bytes(cache, buf.getvalue())
    except OSError as err:  # a read-only home must not stop training
        log.warning("could not write image cache %s (%s)", cache, err)
    return arr


# --------------------------------------------------------------------------- synthetic
def make_synthetic(per_class: int, size: int, seed: int = 0) -> ImageSet:
    """Brain-MRI-like slices: a bright skull ring, textured tissue, and (label 1) a lesion.

    Lesion size, brightness and position vary, as do head size, contrast and noise, so the
    task needs a real classifier but a tiny one learns it in seconds.
    """
    rng = np.random.default_rng(seed)
    n = 2 * per_class
    labels = np.repeat(np.arange(2, dtype=np.int64), per_class)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    for i in range(n):
        cx, cy = rng.normal(0, 0.05, 2)
        ax, ay = rng.uniform(0.65, 0.85, 2)
        r = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
        brain = (r < 0.92).astype(np.float32)
        skull = np.exp(-((r - 0.97) / 0.04) ** 2)
        tissue = 0.35 + 0.1 * np.sin(xx * rng.uniform(4, 9) + rng.uniform(0, 6)) * np.cos(yy * rng.uniform(4, 9))
        img = brain * tissue * rng.uniform(0.8, 1.2) + 0.9 * skull
        # ventricles: two dark blobs in every scan
        for sx in (-1, 1):
            img -= 0.15 * brain * np.exp(-(((xx - cx - sx * 0.12) / 0.08) ** 2 + ((yy - cy) / 0.2) ** 2))
        if labels[i] == 1:
            ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.55)
            lx, ly = cx + dist * np.cos(ang) * ax, cy + dist * np.sin(ang) * ay
            rad = rng.uniform(0.1, 0.2)
            lesion = np.exp(-(((xx - lx) ** 2 + (yy - ly) ** 2) / rad ** 2) ** 2)
            img += rng.uniform(0.35, 0.55) * lesion * brain
        img += rng.normal(0, 0.03, img.shape)
        img = np.clip(img, 0, 1)
        images[i] = (img * 255).astype(np.uint8)[None].repeat(3, 0)
    order = rng.permutation(n)
    return ImageSet(images[order], labels[order], ("healthy", "tumor"), "synthetic")
