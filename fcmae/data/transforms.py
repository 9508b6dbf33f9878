"""Every transform a sample goes through, and the one home of the normalization statistics.

Pre-training (`pretrain_transform`): the paper's RandomResizedCrop + flip on the uint8 image; the
batch goes to float and is normalized in one pass on the device (`ToFloat`). Labelled data (`train_transform`, `eval_transform`): the
release's fine-tuning recipe built by timm, normalized, for images; the same geometry on tensors
for `.npy` arrays (no normalization, no RandAugment: its operations are defined on RGB images).
"""
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from torchvision.transforms import InterpolationMode, v2

# (mean, std) per channel count of images; grayscale gets the mean of ImageNet's channel statistics.
# Arrays (.npy) are used as stored: no entry.
STATS = {3: (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
         1: ((sum(IMAGENET_DEFAULT_MEAN) / 3,), (sum(IMAGENET_DEFAULT_STD) / 3,))}


def normalization(in_chans, arrays):
    """(mean, std) applied to images of `in_chans` channels, or None for arrays (used as stored)."""
    return None if arrays else STATS[in_chans]


# ----------------------------------------------------------------------------- pre-training

def pretrain_transform(input_size):
    """The paper's augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip, on
    the sample as loaded: a view of an image stays uint8 (C, S, S), a view of an array float32.
    Views travel to the device so, a quarter of float32's bytes, and are normalized there
    (`ToFloat`, fcmae.data.modules.PretrainData)."""
    return v2.Compose([
        v2.ToImage(),  # PIL -> uint8 tensor; tensors (decoded JPEGs, arrays) pass through as images
        v2.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        PlainTensor()])


class PlainTensor(torch.nn.Module):
    """A torchvision image -> the plain tensor it holds (same storage), which batches collate into."""

    def forward(self, x):
        return x.as_subclass(torch.Tensor)


class ToFloat(torch.nn.Module):
    """uint8 (C, H, W) or (N, C, H, W) -> float32 (x / 255 - mean) / std, as v2.ToDtype(scale=True)
    + v2.Normalize give (up to float rounding) but with one float copy instead of three. Float
    tensors (arrays) pass through as they are, normalized if `norm`. The same numbers on a batch
    as on each of its views: elementwise, on any device."""

    def __init__(self, norm):
        super().__init__()
        self.norm, self.stats = norm, {}

    def forward(self, x):
        scale = 255.0 if x.dtype == torch.uint8 else 1.0
        x = x.as_subclass(torch.Tensor).to(torch.float32, copy=True)
        if self.norm is None:
            return x.div_(scale) if scale != 1 else x
        mean, std = self.scaled_stats(scale, x.device)
        return x.sub_(mean).div_(std)

    def scaled_stats(self, scale, device):
        """(mean, std) x `scale` as (C, 1, 1) tensors on `device`, made once: a copy to a GPU
        from ordinary memory waits for the GPU, so none is made per batch."""
        if (scale, device) not in self.stats:
            self.stats[scale, device] = tuple((torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) * scale).to(device)
                                              for v in self.norm)
        return self.stats[scale, device]


# ----------------------------------------------------------------------------- labelled data

class ImageOrArray:
    """One transform for both kinds of sample: a tensor (an array) goes through `array`, anything
    else (a PIL image) through `image`. `image_only`: what `image` does that `array` leaves out."""

    def __init__(self, image, array, image_only=None):
        self.image, self.array, self.image_only = image, array, image_only

    def __call__(self, x):
        return self.array(x) if isinstance(x, torch.Tensor) else self.image(x)

    @property
    def transforms(self):
        """The image pipeline's steps (timm's Compose)."""
        return self.image.transforms

    def __repr__(self):
        return f"ImageOrArray(image={self.image}, array={self.array})"


def train_transform(input_size, in_chans=3, aa="rand-m9-mstd0.5-inc1", reprob=0.25):
    """RandomResizedCrop + flip + RandAugment + random erasing, bicubic (the release's recipe);
    aa None and reprob 0 leave crop + flip (MAE's linear-probe augmentation). Arrays (tensors):
    the same crop, flip and erasing, without RandAugment (its operations are defined on RGB images)."""
    arrays = v2.Compose([
        v2.RandomResizedCrop(input_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomErasing(p=reprob, value="random")])  # timm's re_mode="pixel": per-pixel normal noise
    if in_chans not in STATS:
        return ImageOrArray(None, arrays, f"--aa {aa}" if aa else None)
    mean, std = STATS[in_chans]
    transform = create_transform(input_size, is_training=True, color_jitter=None, auto_augment=aa or None,
                                 interpolation="bicubic", re_prob=reprob, re_mode="pixel", re_count=1,
                                 mean=mean, std=std)
    for t in transform.transforms:
        for op in getattr(t, "ops", ()):  # timm's RandAugment
            if op.aug_fn is timm_posterize:
                op.aug_fn = posterize
    return ImageOrArray(transform, arrays, f"--aa {aa}" if aa else None)


timm_posterize = auto_augment.posterize


def posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, except that keeping 0 bits gives a black image, as Pillow < 13 did:
    Pillow 13 raises instead, and "inc1" asks for 0 bits at magnitude 10 (9 + noise)."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return timm_posterize(img, bits_to_keep, **kwargs)


def eval_transform(input_size, in_chans=3, crop_pct=None):
    """Resize to input_size / crop_pct and center-crop (crop_pct 224/256 below 384 px); from 384
    px up the release resizes straight to input_size, without cropping. Arrays (tensors): the same
    resize and crop on the tensor, no normalization."""
    if crop_pct is None:
        crop_pct = 224 / 256 if input_size < 384 else 1.0
    crop_mode = "squash" if crop_pct == 1.0 else "center"
    bicubic = dict(interpolation=InterpolationMode.BICUBIC, antialias=True)
    if crop_mode == "squash":
        arrays = v2.Resize((input_size, input_size), **bicubic)
    else:  # timm's: the shorter side to floor(input_size / crop_pct), then the center crop
        arrays = v2.Compose([v2.Resize(int(input_size / crop_pct), **bicubic), v2.CenterCrop(input_size)])
    if in_chans not in STATS:
        return ImageOrArray(None, arrays)
    mean, std = STATS[in_chans]
    return ImageOrArray(create_transform(input_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                                         crop_mode=crop_mode, mean=mean, std=std), arrays)
