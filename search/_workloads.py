"""Models and data for a study: built-in digits workloads, user factories, torchvision, ImageFolder."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from edgeslim.objectives import DataSplits, FinetuneConfig, evaluate_accuracy, finetune_, is_label_free, logits_of
from edgeslim.search._registry import BUILTIN_WORKLOADS
from edgeslim.search._storage import file_lock
from edgeslim.search._spec import StudySpec
from edgeslim.spaces import SpecError

__all__ = ["DigitsCNN", "DigitsResNet", "Workload", "builtin_model", "digits_splits", "example_from_data",
           "load_workload"]


class DigitsCNN(nn.Module):
    """Three conv layers and a two-layer head for 8×8 digits (about 32k parameters).

    Example:
        >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class DigitsResNet(nn.Module):
    """A ResNet-10-style network (residual adds) for digits upscaled to 32×32.

    Large enough (0.4 ms and more dense at batch 1 on a 2-core x86 CPU) that compression has
    latency effects above the per-inference overhead.

    Example:
        >>> DigitsResNet()(torch.zeros(1, 1, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = nn.Sequential(_Block(w, w, 1), _Block(w, w, 1))
        self.layer2 = nn.Sequential(_Block(w, 2 * w, 2), _Block(2 * w, 2 * w, 1))
        self.layer3 = nn.Sequential(_Block(2 * w, 4 * w, 2), _Block(4 * w, 4 * w, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclasses.dataclass
class Workload:
    """A base model, its data splits and a batch-1 example input, ready to search.

    Example:
        >>> w = load_workload(demo_spec(), Path("studies/digits-demo"))  # doctest: +SKIP
        >>> w.example_input.shape  # doctest: +SKIP
        torch.Size([1, 1, 8, 8])
    """

    model: nn.Module
    data: DataSplits
    example_input: torch.Tensor
    description: str
    base_accuracy: float
    split_hash: str
    model_hash: str


def _hash_indices(train: list[int], val: list[int]) -> str:
    return hashlib.sha256(json.dumps([sorted(train), sorted(val)]).encode()).hexdigest()[:16]


def model_hash(model: nn.Module) -> str:
    """Short SHA-256 of a model's state dict (names, shapes and values)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def digits_splits(size: int, val_fraction: float, seed: int) -> tuple[DataSplits, str]:
    """scikit-learn's bundled 8×8 digits (no download), scaled to [-1, 1], optionally upscaled.

    Stratified, seeded train/val split; returns the splits and a hash of the split indices.

    Example:
        >>> data, h = digits_splits(8, 0.3, 0)
        >>> len(data.train) + len(data.val), data.num_classes
        (1797, 10)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = np.arange(len(y))
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=digits.target)
    data = DataSplits(TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), 10,
                      tuple(str(i) for i in range(10)))
    return data, _hash_indices(tr.tolist(), va.tolist())


def _import_attr(ref: str, what: str) -> Callable[..., Any]:
    module_name, _, attr = ref.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # user factories live in the working directory, like `python -m`
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"cannot import module {module_name!r} for {what} {ref!r} ({e}); "
                        "check the name and that it is importable from the current folder") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpecError(f"{what} {ref!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def _user_model(spec: StudySpec) -> nn.Module:
    m = spec.model
    if m.factory:
        factory = _import_attr(m.factory, "model factory")
        try:
            model = factory()
        except Exception as e:  # the user's code: say which factory and what it raised, in one line
            raise SpecError(f"model factory {m.factory!r} raised {type(e).__name__}: {str(e)[:200]}; "
                            "fix the factory (it runs from the current folder; --debug shows its traceback)") from None
        if not isinstance(model, nn.Module):
            raise SpecError(f"model factory {m.factory!r} returned {type(model).__name__}, not an nn.Module")
        if model.training:
            raise SpecError(f"model factory {m.factory!r} returned a model in training mode (dropout and "
                            "BatchNorm would act as in training while it is scored); return model.eval()")
    else:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if m.torchvision not in names:
            raise SpecError(f"unknown model {m.torchvision!r}; torchvision classification models "
                            f"include {sorted(names)[:12]}...; or use factory = 'module:function'")
        kwargs = {"num_classes": m.num_classes} if m.num_classes else {}
        model = torchvision.models.get_model(m.torchvision, weights=None, **kwargs)
    if m.checkpoint:
        path = Path(m.checkpoint)
        if not path.is_file():
            raise SpecError(f"checkpoint {m.checkpoint!r} does not exist; give the path of a saved state_dict")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise SpecError(f"checkpoint {m.checkpoint!r} does not fit the model: {str(e)[:300]}") from None
    return model.eval()


def _stratified_subsets(dataset: Dataset, targets: list[int], val_fraction: float, seed: int
                        ) -> tuple[Subset, Subset, str]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(targets))
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=targets)
    return Subset(dataset, tr.tolist()), Subset(dataset, va.tolist()), _hash_indices(tr.tolist(), va.tolist())


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class UnlabelledImages(Dataset):
    """The images lying directly in a folder (no class sub-folders), sorted by name, as inputs
    only: a label-free data set whose targets come from the dense model (teacher top-1).

    Example:
        >>> UnlabelledImages(Path("."), lambda img: img).files[:0]
        []
    """

    def __init__(self, root: Path, transform: Callable[[Any], torch.Tensor]) -> None:
        self.files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB"))


def _image_source(root: Path, tf: Callable[[Any], torch.Tensor]) -> Dataset:
    """An ImageFolder when ``root`` has class sub-folders, else its loose images, label-free."""
    from torchvision import datasets

    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return datasets.ImageFolder(root, transform=tf)
    images = UnlabelledImages(root, tf)
    if not len(images):
        raise SpecError(f"{str(root)!r} holds neither class sub-folders nor images ({', '.join(IMAGE_SUFFIXES)}); "
                        "give a folder of images, or one sub-folder per class")
    return images


def _listing(ds: Dataset) -> list[str]:
    return [str(p) for p in ds.files] if isinstance(ds, UnlabelledImages) else [str(s) for s in ds.samples]


def _user_data(spec: StudySpec) -> tuple[DataSplits, str]:
    d, shape = spec.data, spec.model.input_shape
    if d.image_folder:
        from torchvision import transforms

        root = Path(d.image_folder)
        if not root.is_dir():
            raise SpecError(f"data path {d.image_folder!r} does not exist; give an ImageFolder root "
                            "(one sub-folder per class, or train/ and val/ folders of those, or loose images "
                            "for label-free data)")
        steps: list[Any] = [transforms.Resize(tuple(shape[1:]))]
        if shape[0] == 1:
            steps.append(transforms.Grayscale())
        steps += [transforms.ToTensor(), transforms.Normalize([0.5] * shape[0], [0.5] * shape[0])]
        tf = transforms.Compose(steps)
        if (root / "train").is_dir() and (root / "val").is_dir():
            train, val = _image_source(root / "train", tf), _image_source(root / "val", tf)
            h = hashlib.sha256(json.dumps([_listing(train), _listing(val)]).encode()).hexdigest()[:16]
        else:
            full = _image_source(root, tf)
            if isinstance(full, UnlabelledImages):
                if len(full) < 2:
                    raise SpecError(f"{str(root)!r} holds {len(full)} image; a label-free folder needs at least 2 "
                                    "(some to fine-tune on, some held out)")
                order = np.random.default_rng(spec.seed).permutation(len(full))
                n_val = min(len(full) - 1, max(1, round(len(full) * d.val_fraction)))
                va, tr = order[:n_val].tolist(), order[n_val:].tolist()
                train, val, h = Subset(full, tr), Subset(full, va), _hash_indices(tr, va)
            else:
                train, val, h = _stratified_subsets(full, full.targets, d.val_fraction, spec.seed)
                return DataSplits(train, val, len(full.classes), tuple(full.classes)), h
        if is_label_free(train) or is_label_free(val):
            return DataSplits(train, val, 0), h  # label-free: classes are the model's outputs (load_workload)
        return DataSplits(train, val, len(train.classes), tuple(train.classes)), h
    factory = _import_attr(d.factory, "data factory")
    try:
        out = factory()
    except Exception as e:
        raise SpecError(f"data factory {d.factory!r} raised {type(e).__name__}: {str(e)[:200]}; "
                        "fix the factory (it runs from the current folder; --debug shows its traceback)") from None
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise SpecError(f"data factory {d.factory!r} must return (train, val) or (train, val, num_classes)")
    train, val = out[0], out[1]
    num = out[2] if len(out) == 3 else spec.model.num_classes or len(getattr(train, "classes", []))
    if not num and is_label_free(train):
        return DataSplits(train, val, 0), f"factory:{d.factory}"  # classes: the model's outputs (load_workload)
    if not num:
        raise SpecError(f"cannot tell the number of classes of data factory {d.factory!r}; "
                        "return (train, val, num_classes) or set [model] num_classes")
    names = tuple(getattr(train, "classes", [str(i) for i in range(num)]))
    return DataSplits(train, val, int(num), names), f"factory:{d.factory}"


def train_base(model: nn.Module, data: DataSplits, epochs: int, seed: int) -> float:
    """Train ``model`` from scratch on ``data.train``; returns held-out accuracy."""
    steps_per_epoch = math.ceil(len(data.train) / 64)
    finetune_(model, data, FinetuneConfig(steps=epochs * steps_per_epoch, lr=3e-3, batch_size=64,
                                          weight_decay=1e-4), seed)
    return evaluate_accuracy(model, data)[0]


def _efficientnet_lite0() -> nn.Module:
    from edgeslim.search._pretrained import efficientnet_lite0  # its packages load only when asked for

    return efficientnet_lite0()


_MODELS: dict[str, Callable[[], nn.Module]] = {"digits-cnn": DigitsCNN, "digits-resnet": DigitsResNet,
                                               "efficientnet-lite0": _efficientnet_lite0}


def builtin_model(name: str) -> tuple[nn.Module, tuple[int, int, int], int]:
    """A fresh built-in model, its input shape (without batch) and its default training epochs
    (0: pretrained weights from a package, nothing to train).

    Example:
        >>> model, shape, epochs = builtin_model("digits-resnet")
        >>> type(model).__name__, shape
        ('DigitsResNet', (1, 32, 32))
    """
    if name not in BUILTIN_WORKLOADS:
        raise SpecError(f"unknown built-in model {name!r}; built-ins: {list(BUILTIN_WORKLOADS)}")
    channels, size, epochs = BUILTIN_WORKLOADS[name]
    return _MODELS[name](), (channels, size, size), epochs


def load_workload(spec: StudySpec, out_dir: str | Path, log: Callable[[str], None] = print) -> Workload:
    """Build the study's base model and data; train a built-in base once and cache it in ``out_dir``.

    The cached base is reused on every later run so a resumed study compresses the very
    same weights.
    """
    out_dir = Path(out_dir)
    torch.manual_seed(spec.seed)
    if spec.model.builtin:
        channels, size, epochs = BUILTIN_WORKLOADS[spec.model.builtin]
        if not epochs:
            from edgeslim.search._pretrained import CONFIDENT, TRAIN_CROPS, VAL_CROPS, pretrained_workload

            model, data, split_hash, acc = pretrained_workload(size, TRAIN_CROPS, VAL_CROPS, spec.seed, out_dir, log)
            example = torch.randn((1, channels, size, size), generator=torch.Generator().manual_seed(spec.seed))
            desc = (f"built-in {spec.model.builtin}, pretrained on ImageNet, on crops of photos bundled with "
                    f"scikit-image/scikit-learn ({size}x{size}, label-free: agreement with the dense network on the "
                    f"{len(data.val)} of {VAL_CROPS} held-out crops it classifies with >= {CONFIDENT:.0%} probability; "
                    f"{TRAIN_CROPS} training crops)")
            return Workload(model, data, example, desc, acc, split_hash, model_hash(model))
        model = builtin_model(spec.model.builtin)[0]
        data, split_hash = digits_splits(size, spec.data.val_fraction, spec.seed)
        cache = out_dir / "base_model.pt"
        key = {"workload": spec.model.builtin, "seed": spec.seed, "split": split_hash,
               "epochs": spec.model.train_epochs or epochs}
        out_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(out_dir / "base_model.lock"):  # workers starting together train it once
            if cache.is_file():
                saved = torch.load(cache, map_location="cpu", weights_only=True)
                if saved.get("key") != json.dumps(key, sort_keys=True):
                    raise SpecError(f"{cache} was trained for another setup ({saved.get('key')}); "
                                    "use another study name or out_dir instead of overwriting it")
                model.load_state_dict(saved["state_dict"])
                acc = float(saved["accuracy"])
            else:
                log(f"training the {spec.model.builtin} base model ({key['epochs']} epochs, cached in {cache})")
                acc = train_base(model, data, key["epochs"], spec.seed)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                torch.save({"state_dict": model.state_dict(), "accuracy": acc,
                            "key": json.dumps(key, sort_keys=True)}, tmp)
                tmp.replace(cache)
        example = torch.zeros(1, 1, size, size)
        desc = f"built-in {spec.model.builtin} on scikit-learn digits ({size}x{size})"
    else:
        model = _user_model(spec)
        data, split_hash = _user_data(spec)
        if spec.model.train_epochs:
            train_base(model, data, spec.model.train_epochs, spec.seed)
        example = example_from_data(model, data, spec.model.input_shape)
        if is_label_free(data.train) or is_label_free(data.val):
            from edgeslim.search._objective import with_teacher_labels

            with torch.no_grad():
                classes = data.num_classes or int(logits_of(model.eval()(example)).shape[-1])
            data = with_teacher_labels(dataclasses.replace(data, num_classes=classes), model)
        acc = evaluate_accuracy(model, data)[0]
        desc = spec.model.factory or f"torchvision {spec.model.torchvision}"
        model.eval()
        return Workload(model, data, example, desc, acc, split_hash, model_hash(model))
    model.eval()
    # a random example input: some layers (and torch-pruning's tracer) behave oddly on all zeros
    example = torch.randn(example.shape, generator=torch.Generator().manual_seed(spec.seed))
    return Workload(model, data, example, desc, acc, split_hash, model_hash(model))


def example_from_data(model: nn.Module, data: DataSplits, input_shape: Sequence[int] = ()) -> torch.Tensor:
    """The example input of a user's model: the first training sample as a batch of one, in its
    own dtype (int64 token ids stay int64), checked against ``input_shape`` when given and run
    through the model once, so a sample that does not fit is one clear error, not a trial failure.

    Example:
        >>> d = TensorDataset(torch.randint(0, 9, (4, 6)), torch.zeros(4, dtype=torch.long))
        >>> example_from_data(nn.Sequential(nn.Embedding(9, 3), nn.Flatten(), nn.Linear(18, 2)), DataSplits(d, d, 2)).dtype
        torch.int64
    """
    if len(data.train) == 0:
        raise SpecError("the training split is empty; give data with at least one sample")
    first = data.train[0]
    sample = torch.as_tensor(first[0] if isinstance(first, (tuple, list)) else first).unsqueeze(0)
    if input_shape and list(sample.shape[1:]) != list(input_shape):
        raise SpecError(f"the data's first sample has shape {list(sample.shape[1:])} but [model] input_shape is "
                        f"{list(input_shape)}; fix one of them (input_shape excludes the batch dimension)")
    try:
        with torch.no_grad():
            model.eval()(sample)
    except Exception as e:
        raise SpecError(f"the model cannot run the data's first sample (shape {list(sample.shape)}, "
                        f"{sample.dtype}): {type(e).__name__}: {str(e)[:160]}; check the data factory or "
                        "[model] input_shape") from None
    return sample


def digits_rgb32(seed: int = 0, val_fraction: float = 0.3) -> tuple[Dataset, Dataset, int]:
    """Digits upscaled to 3×32×32: a data factory for torchvision networks (``[data] factory``).

    Example:
        >>> train, val, n = digits_rgb32()
        >>> train[0][0].shape, n
        (torch.Size([3, 32, 32]), 10)
    """
    data, _ = digits_splits(32, val_fraction, seed)
    rgb = [TensorDataset(d.tensors[0].repeat(1, 3, 1, 1), d.tensors[1]) for d in (data.train, data.val)]
    return rgb[0], rgb[1], 10
