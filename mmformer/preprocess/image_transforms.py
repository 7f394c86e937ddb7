"""The PIL steps of :meth:`mmformer.Processor.image_transform` that torchvision's v2 transforms do not have: to the
model's channels through PIL (so that a tensor, an array, a PIL image and a file of one picture give the same
pixels), a crop of extreme aspect ratios before the resize, Hugging Face's center crop (offset rounded down) and a
cover resize for non-square outputs. Each takes and returns a PIL image (``ToChannels`` also a (C, H, W) tensor)."""

from __future__ import annotations

import torch
from PIL import Image

from mmformer.data.io import convert_image

__all__ = ["MAX_ASPECT_FACTOR", "CenterCropFloor", "LimitAspect", "ResizeCover", "ToChannels"]

# Images more than this many times wider (or taller) than the output's aspect ratio are first center-cropped to it:
# the short-side resize would otherwise blow a 1×1,000,000 strip up to gigabytes before the crop throws it away.
MAX_ASPECT_FACTOR = 16


class ToChannels:
    """PIL image / (C, H, W) tensor → PIL image of mode RGB or L.

    Every input goes through PIL, so that it is resized exactly as CLIP's preprocessing does and a tensor, an
    array, a PIL image and a file of the same picture give the same pixels. Float tensors in [0, 1] are rounded
    to 8 bits (what an image file holds) on the way.
    """

    def __init__(self, channels: int):
        self.mode = "RGB" if channels == 3 else "L"

    def __call__(self, img: Image.Image | torch.Tensor) -> Image.Image:
        if isinstance(img, Image.Image):
            return convert_image(img, self.mode)
        if img.shape[-3] == 4:  # RGBA: drop alpha, as PIL's convert("RGB") does
            img = img[..., :3, :, :]
        if img.is_floating_point():
            img = (img * 255).round_().to(torch.uint8)
        from torchvision.transforms.v2.functional import to_pil_image

        return to_pil_image(img).convert(self.mode)


class LimitAspect:
    """Center-crop images far more elongated than the output (see MAX_ASPECT_FACTOR) to that many times its aspect
    ratio. The later center crop keeps only the middle anyway, so the result is the same up to resampling rounding at
    the crop's edges; images within the factor are untouched (bit-identical to CLIP's preprocessing)."""

    def __init__(self, size: tuple[int, int], factor: float = MAX_ASPECT_FACTOR):
        self.size, self.factor = size, factor

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        target = self.size[1] / self.size[0]  # output width / height
        if w > h * target * self.factor:  # too wide: keep the middle columns
            keep = max(1, round(h * target * self.factor))
            left = (w - keep) // 2
            return img.crop((left, 0, left + keep, h))
        if h * target > w * self.factor:  # too tall: keep the middle rows
            keep = max(1, round(w * self.factor / target))
            top = (h - keep) // 2
            return img.crop((0, top, w, top + keep))
        return img


class CenterCropFloor:
    """Center crop to (H, W) with the offset rounded down, as Hugging Face's image processors crop (torchvision's
    CenterCrop rounds half to even: one pixel apart when the margin is 4k + 3). A side shorter than the crop is
    padded with zeros, the extra row or column after the image."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        (h, w), (ch, cw) = (img.height, img.width), self.size
        top = (h - ch) // 2 if h >= ch else -((ch - h) // 2)
        left = (w - cw) // 2 if w >= cw else -((cw - w) // 2)
        return img.crop((left, top, left + cw, top + ch))  # PIL fills what lies outside the image with zeros


class ResizeCover:
    """Scale so the image covers (H, W), keeping its aspect ratio; a non-square generalisation of Resize(int)."""

    def __init__(self, size: tuple[int, int], interpolation):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        import torchvision.transforms.v2.functional as TF

        h, w = TF.get_size(img)
        scale = max(self.size[0] / h, self.size[1] / w)
        new = [max(self.size[0], round(h * scale)), max(self.size[1], round(w * scale))]
        return TF.resize(img, new, interpolation=self.interpolation, antialias=True)
