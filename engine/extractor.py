"""The VGG feature extractor: layer names, weights, and a truncated, frozen forward pass.

Input: RGB images in [0, 1], shape [B, 3, H, W]. ImageNet mean/std normalisation is part of
the extractor, so callers never normalise.

Layers are addressed by name (``conv1_1``, ``relu1_1``, ``pool1`` ... ``relu5_4``, ``pool5``)
or by their index in ``torchvision.models.vgg19().features`` (``"0"``, ``"2"``, ``"5"`` ...),
as in the lecture's nn.Sequential picture. Only the layers up to the deepest one asked for
are run.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torchvision
from torch import nn

from gramstyle.engine.bands import run_layer
from gramstyle.errors import FieldError, WeightsError  # WeightsError: re-exported here
from gramstyle.options import ARCHS, POOLINGS, check_choice, preview

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BUILDERS = {
    "vgg19": (torchvision.models.vgg19, torchvision.models.VGG19_Weights.IMAGENET1K_V1),
    "vgg16": (torchvision.models.vgg16, torchvision.models.VGG16_Weights.IMAGENET1K_V1),
}


def layer_names(features: nn.Sequential) -> list[str]:
    """Names for each module of a VGG ``features`` stack, in order.

    conv{block}_{i}, relu{block}_{i} for the i-th conv of a block, pool{block} for its pool.
    """
    names, block, conv = [], 1, 0
    for module in features:
        if isinstance(module, nn.Conv2d):
            conv += 1
            names.append(f"conv{block}_{conv}")
        elif isinstance(module, nn.ReLU):
            names.append(f"relu{block}_{conv}")
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:  # pragma: no cover - torchvision's VGG has only these three
            raise TypeError(f"unexpected module in VGG features: {module!r}")
    return names


def imagenet_weights_path(arch: str) -> Path:
    """Where torchvision's download cache keeps the ImageNet weights for ``arch``."""
    url = _BUILDERS[arch][1].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _load_imagenet(arch: str, features: nn.Sequential) -> None:
    weights = _BUILDERS[arch][1]
    path = imagenet_weights_path(arch)
    try:
        state = weights.get_state_dict(progress=False, check_hash=False, weights_only=True)
    except Exception as exc:  # no network, proxy refusal, corrupt cache ...
        raise WeightsError(
            f"cannot load ImageNet weights for {arch} ({type(exc).__name__}: {exc}). "
            f"Expected the file {path} (torchvision's cache; set TORCH_HOME to move it). "
            f"Fetch it on a machine with internet with `gramstyle weights fetch --arch {arch}` "
            f"(it prints the path and the SHA-256) and copy it there, or use --weights random "
            f"(a seeded random network) or --weights PATH (a local state_dict file)."
        ) from exc
    _load_state(features, state, f"ImageNet {arch} file {path}")


def _load_file(path: str, features: nn.Sequential, arch: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"file not found: {path!r} (expected imagenet, random, or a path to a "
                           f"VGG state_dict)", path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path!r} is not a weights file: torch cannot read it as a "
                           f"state_dict of tensors written by torch.save "
                           f"({_load_failure(exc)}); give a VGG state_dict file, or imagenet "
                           f"or random", path) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path!r} holds a {type(state).__name__}, not a state_dict", path)
    _load_state(features, state, f"{path!r}", arch)


def _load_failure(exc: Exception) -> str:
    """What went wrong in torch.load, in a few words. torch's own text for a file that is not
    a checkpoint advises re-running with weights_only=False, i.e. unpickling an untrusted
    file, which gramstyle never does: only its first sentence is kept, and not that one."""
    first = str(exc).strip().split(". ")[0].splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in first or len(first) > 120:
        return type(exc).__name__
    return f"{type(exc).__name__}: {first}"


def _load_state(features: nn.Sequential, state: dict, what: str, arch: str = "") -> None:
    """Load a whole-VGG (``features.N.*``) or features-only (``N.*``) state dict, strictly."""
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    expected = features.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{what} does not match {arch or 'the'} VGG features: "
            f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
            f"{_other_arch_hint(state, arch)}"
        )
    for key, tensor in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise WeightsError(f"{what}: key {key!r} has shape {shape}, "
                               f"expected {tuple(tensor.shape)}")
    features.load_state_dict({k: state[k].float() for k in expected})


def _other_arch_hint(state: dict, arch: str) -> str:
    """"; this looks like a VGG16 state dict: add --arch vgg16" when ``state`` (features
    keys) has exactly the keys and shapes of the other architecture's features, else ""."""
    for other in _BUILDERS:
        if other == arch:
            continue
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            expected = _BUILDERS[other][0](weights=None).features.state_dict()
        if state.keys() == expected.keys() and all(
                isinstance(state[k], torch.Tensor) and state[k].shape == v.shape
                for k, v in expected.items()):
            advice = "use --arch vgg19 (the default)" if other == "vgg19" else f"add --arch {other}"
            return f"; this looks like a {other.upper()} state dict: {advice}"
    return ""


class VGGFeatures(nn.Module):
    """A frozen VGG ``features`` stack that returns the activations of named layers.

    Args:
        arch: 'vgg19' (default) or 'vgg16'.
        weights: 'imagenet' (torchvision IMAGENET1K_V1 via its download cache), 'random'
            (seeded random init, the lecture's RandomNet), or a path to a state_dict of a
            whole VGG or of ``features`` alone.
        pooling: 'max' or 'avg' (avg pooling gives smoother results, as in Gatys et al.).
        seed: seed of the random weights when ``weights='random'``.
    """

    def __init__(self, arch: str = "vgg19", weights: str = "imagenet", pooling: str = "max",
                 seed: int = 0):
        super().__init__()
        check_choice("arch", arch, ARCHS)
        check_choice("pooling", pooling, POOLINGS)
        if not isinstance(weights, str) or not weights:
            raise WeightsError(f"must be imagenet, random or a file path, got {weights!r}", weights)
        build = _BUILDERS[arch][0]
        if weights == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                features = build(weights=None).features
        else:
            features = build(weights=None).features
            if weights == "imagenet":
                _load_imagenet(arch, features)
            else:
                _load_file(weights, features, arch)
        modules = []
        for module in features:
            if isinstance(module, nn.ReLU):
                # torchvision's ReLUs are in-place, which would overwrite the conv outputs
                # we capture as features.
                module = nn.ReLU(inplace=False)
            elif isinstance(module, nn.MaxPool2d) and pooling == "avg":
                module = nn.AvgPool2d(kernel_size=2, stride=2)
            modules.append(module)
        self.layers = nn.Sequential(*modules)
        self.arch, self.weights, self.pooling = arch, weights, pooling
        self.layer_names = layer_names(self.layers)
        self._index = {name: i for i, name in enumerate(self.layer_names)}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def resolve(self, layer: str | int, field: str = "layers") -> str:
        """Canonical name of a layer given by name or by its ``features`` index."""
        key = str(layer).strip()
        if key in self._index:
            return key
        # (a length test first: int() refuses strings of over 4300 digits)
        if key.isascii() and key.isdigit() and len(key) < 4 and int(key) < len(self.layer_names):
            return self.layer_names[int(key)]
        raise FieldError(
            field, f"unknown layer {preview(layer)} for {self.arch}; use a name such as relu4_2 "
            f"(one of {self.layer_names[0]} ... {self.layer_names[-1]}) or an index 0.."
            f"{len(self.layer_names) - 1}", layer)

    def resolve_all(self, layers: Iterable[str | int], field: str) -> tuple[str, ...]:
        """Canonical names of several layers; each layer may appear once."""
        names: dict[str, str | int] = {}
        for layer in layers:
            name = self.resolve(layer, field)
            if name in names:
                raise FieldError(field, f"layer {name} is listed twice "
                                 f"({preview(names[name])} and {preview(layer)})", layer)
            names[name] = layer
        return tuple(names)

    def min_side(self, layers: Iterable[str]) -> tuple[str, int]:
        """The deepest of ``layers`` and the smallest image side (px) that reaches it with at
        least one feature pixel: 2 ** (pooling layers before it)."""
        deepest = max((self._index[self.resolve(n)] for n in layers), default=0)
        pools = sum(1 for name in self.layer_names[: deepest + 1] if name.startswith("pool"))
        return self.layer_names[deepest], 2 ** pools

    def forward(self, images: torch.Tensor, layers: Iterable[str],
                check: Callable[[float], None] | None = None) -> dict[str, torch.Tensor]:
        """Activations of ``layers`` for ``images`` ([B,3,H,W], RGB in [0,1]).

        Runs the network only up to the deepest requested layer. ``check`` is told the
        estimated seconds of each layer, of each band of a large layer, and of their
        backward passes, before they run (:func:`gramstyle.engine.bands.run_layer`); it
        raises to stop a cancelled request within a fraction of a second.
        """
        wanted = {self._index[self.resolve(name)] for name in layers}
        if not wanted:
            return {}
        x = (images - self.mean) / self.std
        if x.device.type == "cpu":
            # oneDNN convolutions are markedly faster in channels_last on CPU.
            x = x.contiguous(memory_format=torch.channels_last)
        out = {}
        for i, module in enumerate(self.layers[: max(wanted) + 1]):
            x = run_layer(module, x, check)
            if i in wanted:
                out[self.layer_names[i]] = x
        return out
