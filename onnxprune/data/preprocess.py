"""Preprocessing of samples: ``Preprocess`` options and what they do to each batch.

Image pipeline, per sample
--------------------------
1. Channels: mean of R, G, B when ``grayscale`` (auto: when the input has 1 channel);
   a 1-channel image feeding a 3-channel input is repeated.
2. Resize with Pillow's BILINEAR filter: ``resize=int`` sets the shorter side (the
   longer is ``int(r * long / short)``, as torchvision), ``resize=(h, w)`` is exact. With
   no ``resize`` and no ``center_crop``, an image whose H x W differs from the input's
   fixed spatial dims is resized to exactly those dims. uint8 images are resized as
   uint8 (modes L / RGB); a gray image averaged from RGB is float and is resized as
   float (mode F), so it is never rounded before resizing.
3. Center crop (offsets ``round((H - h) / 2)``, as torchvision).
4. float32, ``* scale``, ``(x - mean) / std`` per channel, then the input's layout.

Reproducing the measured accuracies (shared/README.md)
-------------------------------------------------------
Measured with this module (tests/data/test_samples.py, top-1 of argmax logits):
LeNet 99.07 / 75.44 / 51.29 (MNIST / USPS / MNIST-M gray), mnist_cnn_fc3136
98.77 / 78.43 / 53.85, mnist_extdata USPS 45.94, ResNet-20 on JPEG CIFAR-10 81.03,
MobileNetV2 on the 500 ImageNet samples 82.60. Variants tried: the digit numbers are
insensitive to the order of gray conversion and resize and to uint8-vs-float resizing
(all within 0.1 point; Pillow's ITU-R 601 ``convert("L")`` instead of the channel mean
loses about 3 points on MNIST-M). For MobileNetV2 the resize must run on uint8: resizing
the same images in float gives 83.4 %, not 82.6 %.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
from PIL import Image

from onnxprune.errors import DataError
from onnxprune.model import InputSpec

LAYOUTS = ("NCHW", "NHWC")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How raw uint8 images become model input. Float arrays are taken as already preprocessed.

    resize: int sets the shorter side (aspect kept); (h, w) is exact; None: only the
        automatic resize to the input's fixed spatial dims (when there is no center_crop).
    center_crop: int (square) or (h, w), applied after resize.
    grayscale: True converts RGB to gray (mean of channels); None converts when the model
        input has 1 channel.
    scale, mean, std: x = (pixel * scale - mean) / std, per channel (one value or one per
        channel).
    layout: the model input's layout, "NCHW" or "NHWC".
    """

    resize: int | tuple[int, int] | None = None
    center_crop: int | tuple[int, int] | None = None
    grayscale: bool | None = None
    scale: float = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "NCHW"

    def __post_init__(self):
        object.__setattr__(self, "resize", _check_size("preprocess.resize", self.resize))
        object.__setattr__(self, "center_crop", _check_size("preprocess.center_crop", self.center_crop))
        if self.grayscale is not None and not isinstance(self.grayscale, (bool, np.bool_)):
            raise DataError("preprocess.grayscale", f"must be True, False or None, not {self.grayscale!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float, np.number)) \
                or not math.isfinite(self.scale) or self.scale <= 0:
            raise DataError("preprocess.scale", f"must be a positive finite number, not {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))
        mean = _check_values("preprocess.mean", self.mean)
        std = _check_values("preprocess.std", self.std)
        if std is not None and min(std) <= 0:
            raise DataError("preprocess.std", f"must be positive, got {std}")
        if mean is not None and std is not None and len(mean) != len(std):
            raise DataError("preprocess", f"mean has {len(mean)} values but std has {len(std)}",
                            "give one value, or one per channel, for both")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if self.layout not in LAYOUTS:
            raise DataError("preprocess.layout", f"must be 'NCHW' or 'NHWC', not {self.layout!r}")


def _check_size(thing: str, value) -> int | tuple[int, int] | None:
    if value is None:
        return None
    if is_int(value):
        if value <= 0:
            raise DataError(thing, f"must be positive, not {value}")
        return int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) for v in value):
        if min(value) <= 0:
            raise DataError(thing, f"must be positive, not {tuple(value)}")
        return (int(value[0]), int(value[1]))
    raise DataError(thing, f"must be an int or an (h, w) pair, not {value!r}")


def _check_values(thing: str, value) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, (int, float, np.number)) else tuple(value)
    if not values or not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                             and math.isfinite(v) for v in values):
        raise DataError(thing, f"must be one or more finite numbers, not {value!r}")
    return tuple(float(v) for v in values)


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def prepare(raw, spec: InputSpec, preprocess: Preprocess, name: str) -> np.ndarray:
    """Raw samples (array (n, ...) or list of (H, W, C) uint8 images) -> checked feed for ``spec``."""
    where = f"{name} [{spec.name}]"
    if isinstance(raw, list):
        out = [_image_pipeline(image[None], spec, preprocess, where) for image in raw]
        shapes = sorted({o.shape[1:] for o in out})
        if len(shapes) > 1:
            raise DataError(where, f"images come out in different sizes {[dims_text(s) for s in shapes[:3]]}",
                            "give --resize and/or --center-crop (preprocess resize, center_crop)")
        feed = np.concatenate(out)
    elif is_image_batch(raw, spec):
        feed = _image_pipeline(_to_hwc(raw, spec, preprocess, where), spec, preprocess, where)
    else:
        feed = _prepare_array(raw, spec, preprocess, where)
    _check_shape(feed, spec, preprocess, where)
    if feed.dtype.kind == "f" and not np.isfinite(feed).all():
        raise DataError(where, "preprocessing produced NaN or inf values")
    return feed


def is_image_batch(raw: np.ndarray, spec: InputSpec) -> bool:
    """Whether ``raw`` is a batch of images for ``spec`` (uint8 of rank 3 or 4 to a float input),
    which the image pipeline transforms; other arrays are fed as they are."""
    return raw.dtype == np.uint8 and np.issubdtype(spec.dtype, np.floating) and raw.ndim in (3, 4)


def _to_hwc(raw: np.ndarray, spec: InputSpec, pre: Preprocess, where: str) -> np.ndarray:
    """uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) -> (N, H, W, C).

    A last dim of 1, 3 or 4 means channels last, unless the array already has exactly the
    per-sample shape of an NCHW input (as (N, 3, 4, 4) for a 3x4x4 input).
    """
    if raw.ndim == 3:
        return raw[..., None]
    chw = raw.shape[1] in (1, 3, 4)
    if chw and pre.layout == "NCHW" and spec.rank == 4 and raw.shape[1:] == spec.shape[1:]:
        return raw.transpose(0, 2, 3, 1)
    if raw.shape[-1] in (1, 3, 4):
        return raw
    if chw:
        return raw.transpose(0, 2, 3, 1)
    raise DataError(where, f"uint8 data of shape {raw.shape} is not an image batch "
                           "(N,H,W), (N,H,W,C) or (N,C,H,W)",
                    "pass float arrays if the data is already preprocessed")


def _image_axes(spec: InputSpec, layout: str, where: str) -> tuple[int | None, tuple]:
    """(wanted channels or None, (H, W) dims) of an image input."""
    if spec.rank == 4:
        if layout == "NCHW":
            return _fixed(spec.shape[1]), (spec.shape[2], spec.shape[3])
        return _fixed(spec.shape[3]), (spec.shape[1], spec.shape[2])
    if spec.rank == 3:
        return 1, (spec.shape[1], spec.shape[2])
    raise DataError(where, f"images need an input of rank 4 (or 3), but it is {dims_text(spec.shape)}")


def _fixed(dim) -> int | None:
    return dim if isinstance(dim, int) else None


def _image_pipeline(images: np.ndarray, spec: InputSpec, pre: Preprocess, where: str) -> np.ndarray:
    """(n, H, W, C) uint8 images of one size -> (n, ...) float input in the model's layout."""
    channels, (height, width) = _image_axes(spec, pre.layout, where)
    images = _match_channels(images, channels, pre.grayscale, where, _layout_hint(spec, pre))
    size = _resize_target(images.shape[1:3], pre, (_fixed(height), _fixed(width)))
    if size is not None and size != images.shape[1:3]:
        limit = Image.MAX_IMAGE_PIXELS          # the largest image Pillow decodes without a warning
        if limit and size[0] * size[1] > limit:     # before allocating it (--resize 100000: 10 GB an image)
            raise DataError(where, f"resizing to {size[0]}x{size[1]} makes images of {size[0] * size[1]} "
                                   f"pixels, more than Pillow decodes without a warning ({limit})",
                            "give a --resize near the model's input size (preprocess resize)")
        _note_squeeze(images.shape[1:3], size, pre, where)
        images = _resize(images, size)
    if pre.center_crop is not None:
        images = _center_crop(images, pre.center_crop, where)
    x = images.astype(np.float32) * np.float32(pre.scale)
    c = x.shape[-1]
    for values, what in ((pre.mean, "mean"), (pre.std, "std")):
        if values is not None and len(values) not in (1, c):
            raise DataError(where, f"--{what} has {len(values)} values for {c}-channel images",
                            f"give {'1 value' if c == 1 else f'1 or {c} values'} (preprocess {what})")
    if pre.mean is not None:
        x -= np.asarray(pre.mean, dtype=np.float32)
    if pre.std is not None:
        x /= np.asarray(pre.std, dtype=np.float32)
    if spec.rank == 3:
        x = x[..., 0]
    elif pre.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=spec.dtype)


def _match_channels(images: np.ndarray, channels: int | None, grayscale: bool | None, where: str,
                    hint: str | None) -> np.ndarray:
    """Drop alpha, convert to gray (mean of RGB, float32) or repeat gray to 3 channels."""
    if images.shape[-1] == 4:
        images = images[..., :3]
    gray = grayscale if grayscale is not None else channels == 1
    if gray and images.shape[-1] == 3:
        images = images.astype(np.float32).mean(axis=-1, keepdims=True)
    if images.shape[-1] == 1 and channels == 3:
        images = np.repeat(images, 3, axis=-1)
    if channels is not None and images.shape[-1] != channels:
        if hint is None and channels == 1:
            hint = "the model takes gray images: drop --color (preprocess grayscale=False)"
        raise DataError(where, f"images have {images.shape[-1]} channel{'s' if images.shape[-1] != 1 else ''} but the input wants {channels}",
                        hint)
    return images


#: data names already told that the automatic resize changes their images' aspect ratio
_SQUEEZED: set[str] = set()


def _note_squeeze(size: tuple[int, int], target: tuple[int, int], pre: Preprocess, where: str) -> None:
    """Warn once per data source when the automatic resize to the model's input (no --resize, no
    --center-crop) changes an image's aspect ratio by more than 5 %: photos are then squashed,
    which costs accuracy where the model was trained on crops."""
    if pre.resize is not None or where in _SQUEEZED:
        return
    ratio = (size[1] / size[0]) / (target[1] / target[0])
    if abs(ratio - 1) > 0.05:
        _SQUEEZED.add(where)
        log.warning("%s: images such as %dx%d are resized to the model's %dx%d, changing their aspect ratio; "
                    "give --resize N --center-crop %d (a shorter side, then a centre crop) to keep it",
                    where, size[0], size[1], target[0], target[1], min(target))


def _resize_target(size: tuple[int, int], pre: Preprocess, model_hw: tuple[int | None, int | None]):
    """(h, w) to resize to, or None."""
    height, width = size
    if isinstance(pre.resize, int):
        short = pre.resize
        if height <= width:
            return short, int(short * width / height)
        return int(short * height / width), short
    if pre.resize is not None:
        return pre.resize
    if pre.center_crop is None and None not in model_hw and tuple(model_hw) != (height, width):
        return tuple(model_hw)
    return None


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n, H, W, C) uint8 or float32 -> (n, h, w, C), Pillow BILINEAR; uint8 stays uint8."""
    height, width = size
    out = np.empty((len(images), height, width, images.shape[-1]), dtype=images.dtype)
    whole = images.dtype == np.uint8 and images.shape[-1] in (1, 3)
    for i, image in enumerate(images):
        if whole:
            plane = image[..., 0] if image.shape[-1] == 1 else image
            resized = np.asarray(Image.fromarray(plane).resize((width, height), Image.Resampling.BILINEAR))
            out[i] = resized.reshape(height, width, -1)
        else:
            for c in range(image.shape[-1]):
                plane = Image.fromarray(np.ascontiguousarray(image[..., c], dtype=_plane_dtype(image.dtype)))
                out[i, ..., c] = np.asarray(plane.resize((width, height), Image.Resampling.BILINEAR))
    return out


def _plane_dtype(dtype: np.dtype):
    return np.uint8 if dtype == np.uint8 else np.float32


def _center_crop(images: np.ndarray, crop: int | tuple[int, int], where: str) -> np.ndarray:
    height, width = images.shape[1:3]
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    if ch > height or cw > width:
        raise DataError(where, f"image {height}x{width} is smaller than center_crop {ch}x{cw}",
                        "resize to at least the crop size first")
    top, left = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))
    return images[:, top:top + ch, left:left + cw]


def _prepare_array(raw: np.ndarray, spec: InputSpec, pre: Preprocess, where: str) -> np.ndarray:
    """Already-preprocessed numbers -> the model dtype, with a unit channel axis added if missing."""
    if raw.dtype.kind not in "biuf" or not np.can_cast(raw.dtype, spec.dtype, "same_kind"):
        raise DataError(where, f"data of dtype {raw.dtype} cannot be cast to the input's {spec.dtype}")
    if raw.dtype.kind in "biu" and spec.dtype.kind == "f":
        # uint8 images went through the image pipeline before this; other integers are most
        # likely labels, token ids or unscaled pixels, and a silent cast would hide that
        if raw.dtype == np.uint8:        # not (N, H, W[, C]) / (N, C, H, W): not an image batch
            raise DataError(where, f"uint8 samples of shape {dims_text(raw.shape[1:])} for the {spec.dtype} input "
                                   f"{spec.name!r}: uint8 arrays are read as images (N, H, W), (N, H, W, C) or "
                                   "(N, C, H, W)", f"reshape them to images, or save preprocessed {spec.dtype} values")
        raise DataError(where, f"{raw.dtype} samples for the {spec.dtype} input {spec.name!r}: integer arrays are "
                               "taken only as uint8 images or for integer inputs",
                        f"save preprocessed values as {spec.dtype} (or images as uint8)")
    if raw.ndim == spec.rank - 1 and spec.rank >= 3:
        axis = spec.rank - 1 if (pre.layout == "NHWC" and spec.rank == 4) else 1
        if spec.shape[axis] == 1:
            raw = np.expand_dims(raw, axis)
    if raw.ndim != spec.rank:
        raise DataError(where, f"data has rank {raw.ndim} ({dims_text(raw.shape)}) but the input has rank "
                               f"{spec.rank} ({dims_text(spec.shape)})",
                        "batches must include the batch dimension")
    return np.ascontiguousarray(raw, dtype=spec.dtype)


def _check_shape(feed: np.ndarray, spec: InputSpec, pre: Preprocess, where: str) -> None:
    """Fixed dims after the batch dim must match; symbolic ones match anything."""
    if feed.ndim != spec.rank:
        raise DataError(where, f"samples have rank {feed.ndim - 1} ({dims_text(feed.shape[1:])}) "
                               f"but the input has rank {spec.rank - 1} ({dims_text(spec.shape[1:])}) per sample")
    if any(isinstance(want, int) and got != want for got, want in zip(feed.shape[1:], spec.shape[1:])):
        raise DataError(where, f"samples are {dims_text(feed.shape[1:])} "
                               f"but the input wants {dims_text(spec.shape[1:])}", _layout_hint(spec, pre))


def _layout_hint(spec: InputSpec, pre: Preprocess) -> str | None:
    if spec.rank == 4 and pre.layout == "NCHW" and spec.shape[3] in (1, 3) and spec.shape[1] not in (1, 3):
        return "the input looks NHWC: give --layout NHWC (preprocess layout='NHWC')"
    if spec.rank == 4 and pre.layout == "NHWC" and spec.shape[1] in (1, 3) and spec.shape[3] not in (1, 3):
        return "the input looks NCHW: drop --layout NHWC (preprocess layout='NCHW')"
    return None


def dims_text(shape) -> str:
    return "x".join(str(d) if d is not None else "?" for d in shape) or "scalar"


#: common ways a model expects its pixels, (scale, mean, std): what ``api.preprocessing_hint`` tries
#: when the original scores poorly on labelled images (ImageNet's mean/std needs 3 channels)
CONVENTIONS = (
    (1 / 255, None, None),                                                 # pixels / 255, in [0, 1]
    (1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),               # ImageNet's mean and std
    (1 / 255, (0.5,), (0.5,)),                                             # in [-1, 1]
    (1.0, None, None),                                                     # pixels 0..255
)


def conventions(pre: Preprocess, spec: InputSpec) -> list[Preprocess]:
    """``pre`` with each other ``CONVENTIONS`` normalisation (resize, crop, channels and layout
    kept) that fits the input's channels."""
    channels = _image_axes(spec, pre.layout, spec.name)[0] if spec.rank in (3, 4) else None
    out = []
    for scale, mean, std in CONVENTIONS:
        if mean is not None and len(mean) not in (1, channels):
            continue
        other = dataclasses.replace(pre, scale=scale, mean=mean, std=std)
        if (other.scale, other.mean, other.std) != (pre.scale, pre.mean, pre.std):
            out.append(other)
    return out


def normalisation_flags(pre: Preprocess) -> str:
    """``pre``'s --scale, --mean and --std as command-line flags ('no --mean/--std' when neither)."""
    flags = [] if math.isclose(pre.scale, 1 / 255) else [f"--scale {pre.scale:g}"]
    flags += [f"--{what} {','.join(f'{v:g}' for v in values)}" for what, values in (("mean", pre.mean), ("std", pre.std))
              if values is not None]
    if pre.mean is None and pre.std is None:
        flags.append("and no --mean/--std" if flags else "no --mean/--std")
    return " ".join(flags)
