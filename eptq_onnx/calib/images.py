"""Image calibration files: the input they fit, their size, layout and normalization, and their pixels as arrays."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
import numpy as np
from PIL import Image
from eptq_onnx.config import ImageOptions
from eptq_onnx.errors import CalibrationError, UsageError
from eptq_onnx.calib.specs import InputSpec, describe_inputs, format_shape
from eptq_onnx.calib.files import reason


@dataclass(frozen=True)
class ImageTarget:
    """How image files become samples of the model's one image input."""

    mode: str  # PIL mode: "RGB" or "L"
    height: int
    width: int
    mean: np.ndarray  # per channel, in the model's channel order
    std: np.ndarray
    scale: float
    layout: str
    bgr: bool

    @property
    def sample_shape(self) -> tuple[int, ...]:
        channels = len(self.mean)
        if self.layout == "nchw":
            return (channels, self.height, self.width)
        return (self.height, self.width, channels)

def image_target(path: Path, specs: Sequence[InputSpec], options: ImageOptions) -> ImageTarget:
    """Check that images fit the model (one rank-4 float input, 1 or 3 channels) and the options."""
    if len(specs) != 1 or len(specs[0].shape) != 4 or specs[0].dtype.kind != "f":
        raise CalibrationError(
            f"{path}: image files need a model with one rank-4 float input, but the model takes "
            f"{describe_inputs(specs)}: use .npy/.npz files"
        )
    spec = specs[0]
    if options.layout not in ("nchw", "nhwc"):
        raise UsageError(f"image layout {options.layout!r} is not supported: choose nchw or nhwc")
    channel_axis, height_axis, width_axis = (1, 2, 3) if options.layout == "nchw" else (3, 1, 2)
    channels = spec.shape[channel_axis] or 3
    if channels not in (1, 3):
        raise CalibrationError(
            f"{path}: model input {spec.name!r} {format_shape(spec.shape)} has {channels} channels in "
            f"{options.layout} layout but images give 1 or 3: check the image layout or use .npy files"
        )
    height, width = _image_size(path, spec, options, (height_axis, width_axis))
    std = _per_channel("std", options.std, channels)
    if not np.all(std != 0):
        raise UsageError(f"image std {tuple(options.std)} must not contain 0")
    return ImageTarget(
        mode="L" if channels == 1 else "RGB",
        height=height,
        width=width,
        mean=_per_channel("mean", options.mean, channels),
        std=std,
        scale=float(options.scale),
        layout=options.layout,
        bgr=options.bgr,
    )

def _image_size(path: Path, spec: InputSpec, options: ImageOptions, axes: tuple[int, int]) -> tuple[int, int]:
    """(H, W) images are resized to: --image-size, else the model's fixed H and W."""
    model_size = tuple(spec.shape[axis] for axis in axes)
    if options.size is None:
        if None in model_size:
            raise CalibrationError(
                f"{path}: model input {spec.name!r} {format_shape(spec.shape)} has a dynamic height or width: "
                f"give --image-size H W"
            )
        return model_size  # type: ignore[return-value]
    height, width = (int(value) for value in options.size)
    if height < 1 or width < 1:
        raise UsageError(f"--image-size {height} {width} must be positive")
    if any(want not in (None, got) for want, got in zip(model_size, (height, width))):
        raise UsageError(
            f"--image-size {height} {width} does not match model input {spec.name!r} "
            f"{format_shape(spec.shape)} ({options.layout}): give the model's height and width"
        )
    return height, width

def _per_channel(label: str, values: Sequence[float], channels: int) -> np.ndarray:
    """Per-channel mean/std: one value per channel, or one value (or all equal values) for all."""
    values = tuple(float(value) for value in values)
    if len(values) != channels:
        if len(set(values)) != 1:
            raise UsageError(
                f"image {label} has {len(values)} values but the model takes {channels}-channel images: "
                f"give {channels} value(s)"
            )
        values = values[:1] * channels
    return np.asarray(values, dtype=np.float64)

def probe_image(path: Path) -> None:
    """Open the image header (cheap) so unreadable images are reported up front."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - the header is parsed on open
    except Exception as exc:
        raise CalibrationError(f"{path}: cannot read image ({reason(exc)})") from exc

def load_image(path: Path, target: ImageTarget) -> np.ndarray:
    """One image as a float32 sample: (pixel * scale - mean) / std, channels in model order and layout."""
    try:
        with Image.open(path) as image:
            image = image.convert(target.mode)
            if image.size != (target.width, target.height):
                image = image.resize((target.width, target.height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float64)
    except Exception as exc:
        raise CalibrationError(f"{path}: cannot read image ({reason(exc)})") from exc
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if target.bgr:
        pixels = pixels[:, :, ::-1]
    values = (pixels * target.scale - target.mean) / target.std
    if target.layout == "nchw":
        values = values.transpose(2, 0, 1)
    return np.ascontiguousarray(values, dtype=np.float32)
