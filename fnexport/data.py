"""Images in, preprocessed NCHW float32 batches out; plus the embedded sets the project makes itself."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fnexport.console import log
from fnexport.errors import BadInput

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
EMBEDDED = ("natural", "digits")
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_VERSION = "1"
# Parity images when none are named: real photos, never pure noise (random tensors hide INT8 damage).
DEFAULT_DATA = "embedded:natural"
# Convert, the gate and `build-engine` draw the same seeded sample, so their figures compare.
PARITY_SEED = 1


# How an image becomes the input size: "crop" is the classifiers' (short side to size/crop_pct, center crop);
# backbones take the detector's: "letterbox" (fit inside H x W keeping the aspect, top-left, zero padding
# after normalisation, as mmdetection's Resize(keep_ratio) + Pad), "stretch" (H x W, aspect not kept) or "none"
# (no scaling: the top-left H x W, zero-padded where the image is smaller).
RESIZE_RULES = ("crop", "letterbox", "stretch", "none")


@dataclass(frozen=True)
class Preprocess:
    """Resize by `resize` (default: short side to size/crop_pct, center-crop size x size), then (x/255 - mean)/std.

    `size` is one number (square) or (height, width)."""

    size: int | tuple[int, int] = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    resize: str = "crop"

    def __call__(self, img: Image.Image) -> np.ndarray:
        img = to_rgb(img)
        if self.resize != "crop":
            return self._detector(img)
        scale = int(self.size / self.crop_pct)  # timm's rule: floor(size / crop_pct)
        w, h = img.size
        if w <= h:
            new = (scale, max(scale, round(h * scale / w)))
        else:
            new = (max(scale, round(w * scale / h)), scale)
        img = img.resize(new, INTERPOLATIONS[self.interpolation])
        left, top = (new[0] - self.size) // 2, (new[1] - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        return self._normalize(img)

    def _normalize(self, img: Image.Image) -> np.ndarray:
        # (x/255 - mean)/std as one scale and shift, in place on a contiguous CHW copy: two passes instead of
        # four over the pixels (a quarter less preprocessing time for val/parity; equal to ~1e-7).
        std = np.array(self.std, np.float32)
        x = np.asarray(img).transpose(2, 0, 1).astype(np.float32)
        x *= (1 / (255 * std))[:, None, None]
        x -= (np.array(self.mean, np.float32) / std)[:, None, None]
        return x

    def _detector(self, img: Image.Image) -> np.ndarray:
        h, w = (self.size, self.size) if isinstance(self.size, int) else self.size
        if self.resize == "stretch":
            return self._normalize(img.resize((w, h), INTERPOLATIONS[self.interpolation]))
        if self.resize == "letterbox":
            scale = min(w / img.width, h / img.height)
            size = (max(1, min(w, round(img.width * scale))), max(1, min(h, round(img.height * scale))))
            img = img.resize(size, INTERPOLATIONS[self.interpolation])
        part = self._normalize(img.crop((0, 0, min(w, img.width), min(h, img.height))))
        x = np.zeros((3, h, w), np.float32)
        x[:, : part.shape[1], : part.shape[2]] = part
        return x


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode PIL reads (L, LA, P, RGBA, CMYK, I;16, I, F) as 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white, as viewers show it; a bare convert would keep the hidden colours.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image


@dataclass
class ImageSet:
    """A preprocessed batch with optional labels (ImageFolder layout) and what could not be read."""

    x: np.ndarray
    labels: np.ndarray | None
    classes: list[str] | None
    files: list[str]
    skipped: list[str]
    source: str


def batches(x: np.ndarray, size: int, pad: bool = False) -> Iterator[tuple[np.ndarray, int]]:
    """Consecutive chunks of `size` and how many of their items are real; with `pad`, the last chunk is
    filled up by repeating its final item, for graphs with a fixed batch."""
    for i in range(0, len(x), size):
        part = x[i : i + size]
        n = len(part)
        if pad and n < size:
            part = np.concatenate([part, np.repeat(part[-1:], size - n, axis=0)])
        yield np.ascontiguousarray(part, np.float32), n


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# Decoding runs in threads (PIL and numpy release the GIL) this many batches ahead of the consumer: enough to
# overlap inference, and the only images in memory besides the batch being used, whatever the set's size.
AHEAD = 2
WORKERS = min(4, os.cpu_count() or 1)


@dataclass
class ImageStream:
    """A folder's images, listed once (recursive, sorted, seeded sample), decoded batch by batch on demand.

    Memory holds the file list and at most AHEAD batches being decoded, never the whole set. `skipped` fills
    as unreadable files are met (one warning each)."""

    folder: Path
    files: list[Path]
    classes: list[str] | None  # ImageFolder layout: one folder per class, images one level below
    pre: Preprocess
    source: str
    skipped: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Images listed (and sampled): an upper bound on what batches() yields, known without decoding."""
        return len(self.files)

    @property
    def labelled(self) -> bool:
        return self.classes is not None

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None, list[str]]]:
        """(x float32 NCHW, folder-class labels or None, files relative to the folder) of `size` readable
        images each (the last may be smaller), in file order; BadInput at the end if none could be read."""
        self.skipped = []
        index = {name: i for i, name in enumerate(self.classes or ())}
        window: deque[tuple[Path, Future]] = deque()
        pending = iter(self.files)
        used = 0
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="fnexport-decode") as pool:

            def refill() -> None:
                while len(window) < AHEAD * size:
                    path = next(pending, None)
                    if path is None:
                        return
                    window.append((path, pool.submit(self._decode, path)))

            try:
                refill()
                while window:
                    arrays, labels, names = [], [], []
                    while window and len(arrays) < size:
                        path, future = window.popleft()
                        x = future.result()
                        refill()
                        if x is None:
                            self.skipped.append(str(path))
                            continue
                        rel = path.relative_to(self.folder)
                        arrays.append(x)
                        names.append(str(rel))
                        if self.classes is not None:
                            labels.append(index[rel.parts[0]])
                    if arrays:
                        used += len(arrays)
                        yield np.stack(arrays), np.array(labels) if self.classes is not None else None, names
            finally:  # the consumer stopped early or failed: drop what was queued instead of decoding it
                for _, future in window:
                    future.cancel()
        if not used:
            raise BadInput(f"{self.folder}: none of the {len(self.files)} images could be read")

    def _decode(self, path: Path) -> np.ndarray | None:
        try:
            with Image.open(path) as img:
                img.load()
                return self.pre(img)
        # DecompressionBombError: a header claiming > 179M pixels (seen in fuzzed BMP/TIFF headers).
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
            log.warning("%s: skipped, not a readable image (%s)", path, str(err).splitlines()[0][:80])
            return None


def open_images(source: str | Path, pre: Preprocess, samples: int | None = None, seed: int = 0) -> ImageStream:
    """A folder (recursive, sorted, seeded sample of `samples`) or an embedded set name, listed, not decoded."""
    folder = resolve(source)
    if not folder.is_dir():
        raise BadInput(f"{folder}: not a folder of images; give a directory (or {EMBEDDED_PREFIX}natural)")
    files = list_images(folder)
    if not files:
        raise BadInput(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under it")
    rel = [p.relative_to(folder).parts for p in files]
    subdirs = sorted({parts[0] for parts in rel if len(parts) > 1})
    labelled = bool(subdirs) and all(len(parts) == 2 for parts in rel)
    if samples is not None and samples < len(files):
        files = sorted(random.Random(seed).sample(files, samples))
    return ImageStream(folder, files, subdirs if labelled else None, pre, str(source))


def load_images(source: str | Path, pre: Preprocess, samples: int | None = None, seed: int = 0) -> ImageSet:
    """The whole (small) set in memory, for what needs repeated passes: calibration, convert-time parity."""
    stream = open_images(source, pre, samples, seed)
    parts = list(stream.batches(64))
    return ImageSet(
        x=np.concatenate([x for x, _, _ in parts]),
        labels=np.concatenate([y for _, y, _ in parts]) if stream.labelled else None,
        classes=stream.classes,
        files=[f for _, _, names in parts for f in names],
        skipped=stream.skipped,
        source=str(source),
    )


def resolve(source: str | Path) -> Path:
    """A folder path as given, or the cached folder of an embedded set ('embedded:natural')."""
    text = str(source)
    if text.startswith(EMBEDDED_PREFIX):
        name = text[len(EMBEDDED_PREFIX) :]
        if name not in EMBEDDED:
            raise BadInput(
                f"{text}: unknown embedded set; use one of {', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED)}"
            )
        return embedded(name)
    return Path(text)


def cache_dir() -> Path:
    """$FNEXPORT_CACHE, else ~/.cache/fnexport; set but empty is refused (it would mean the working directory)."""
    value = os.environ.get("FNEXPORT_CACHE")
    if value is not None and not value.strip():
        raise BadInput("FNEXPORT_CACHE is set but empty; unset it (default ~/.cache/fnexport) or give a folder")
    return Path(value) if value is not None else Path.home() / ".cache" / "fnexport"


def embedded(name: str) -> Path:
    """Make the embedded set once (atomically) in the cache and return its folder."""
    target = cache_dir() / f"{name}-v{EMBEDDED_VERSION}"
    if target.is_dir():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    except OSError as err:  # HOME=/dev/null, a read-only home
        raise BadInput(
            f"{target.parent}: cannot create the embedded image cache there ({err.strerror}); "
            "set FNEXPORT_CACHE to a writable folder"
        ) from None
    try:
        write_embedded(name, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_embedded(name: str, out: Path) -> int:
    """Write an embedded set into `out`; returns the number of images."""
    out.mkdir(parents=True, exist_ok=True)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            (out / str(label)).mkdir(exist_ok=True)
            Image.fromarray((img * (255 / 16)).astype(np.uint8), "L").save(out / str(label) / f"{i:04d}.png")
        return len(digits.target)
    if name == "natural":
        return _write_natural(out)
    raise BadInput(f"{name}: unknown embedded set; use one of {', '.join(EMBEDDED)}")


# scikit-image's bundled photos and scans: grayscale, RGB and one RGBA, no downloads needed.
NATURAL = (
    "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins",
    "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo",
    "microaneurysms", "moon", "page", "retina", "rocket", "text",
)  # fmt: skip


def _write_natural(out: Path) -> int:
    import skimage.data

    rng = random.Random(0)
    count = 0
    for name in NATURAL:
        img = Image.fromarray(getattr(skimage.data, name)())
        w, h = img.size
        # Four views per photo (whole, and three seeded crops, one mirrored) make ~80 distinct inputs.
        boxes = [(0, 0, w, h)]
        for _ in range(3):
            frac = rng.uniform(0.45, 0.8)
            cw, ch = int(w * frac), int(h * frac)
            x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
            boxes.append((x0, y0, x0 + cw, y0 + ch))
        for j, box in enumerate(boxes):
            view = img.crop(box)
            if j == 3:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            view.thumbnail((320, 320), Image.Resampling.LANCZOS)
            # Mixed formats on purpose: loaders must cope with JPEG, PNG, grayscale and alpha.
            if view.mode == "RGBA" or j % 2:
                view.save(out / f"{name}_{j}.png")
            else:
                view.save(out / f"{name}_{j}.jpg", quality=92)
            count += 1
    return count


def make_calibration(
    source: Path, out: Path, per_class: int | None = None, samples: int | None = None, seed: int = 0
) -> int:
    """Copy a seeded, stratified sample of an ImageNet-style tree (per_class images per class) into `out`."""
    source = Path(source)
    for what, value in (("per_class", per_class), ("samples", samples)):
        if value is not None and value < 1:
            raise BadInput(f"--{what.replace('_', '-')} {value}: give a number of images >= 1")
    files = list_images(source) if source.is_dir() else []
    if not files:
        raise BadInput(
            f"{source}: no images found; give an ImageFolder tree (one folder per class) or a folder of images"
        )
    groups: dict[str, list[Path]] = {}
    for f in files:
        rel = f.relative_to(source)
        groups.setdefault(rel.parts[0] if len(rel.parts) > 1 else "", []).append(f)
    rng = random.Random(seed)
    chosen: list[Path] = []
    if per_class is not None:
        for key in sorted(groups):
            chosen += sorted(rng.sample(groups[key], min(per_class, len(groups[key]))))
    else:
        chosen = sorted(rng.sample(files, min(samples or len(files), len(files))))
    out.mkdir(parents=True, exist_ok=True)
    for f in chosen:
        dest = out / f.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    return len(chosen)
