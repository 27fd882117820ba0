"""FID Inception-v3: the standard state-dict layout and parameter count, loading and rejecting weight files,
the two resize modes, the FID graph's pooling quirks, and a forward pass with random weights."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from unnoise.metrics import WEIGHTS_ENV, WEIGHTS_URL, FIDInceptionV3, InceptionFeatureExtractor, load_inception

BASIC_CONV = ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
TOP_LEVEL = [
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
    "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc",
]  # fmt: skip
MIXED_5B = ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
MIXED_7C = [
    "branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b",
    "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b",
]  # fmt: skip
SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_mean": (192,),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3dbl_3b.bn.weight": (384,),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


@pytest.fixture(scope="module")
def network() -> FIDInceptionV3:
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so loading them is visible
        for name, buffer in net.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="module")
def weights(network, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "fid_inception.safetensors"
    save_file(network.state_dict(), str(path))
    return path


def test_state_dict_has_the_standard_key_layout(network):
    state = network.state_dict()
    assert list(dict.fromkeys(key.split(".")[0] for key in state)) == TOP_LEVEL
    assert [k for k in state if k.startswith("Conv2d_1a_3x3.")] == [f"Conv2d_1a_3x3.{k}" for k in BASIC_CONV]
    expected_5b = [f"Mixed_5b.{m}.{k}" for m in [*MIXED_5B, "branch_pool"] for k in BASIC_CONV]
    assert [k for k in state if k.startswith("Mixed_5b.")] == expected_5b
    expected_7c = [f"Mixed_7c.{m}.{k}" for m in [*MIXED_7C, "branch_pool"] for k in BASIC_CONV]
    assert [k for k in state if k.startswith("Mixed_7c.")] == expected_7c
    assert not any("AuxLogits" in k for k in state)
    for key, shape in SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert all(m.eps == 0.001 for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(m.bias is None for m in network.modules() if isinstance(m, torch.nn.Conv2d))


def test_parameter_counts(network):
    params = sum(p.numel() for p in network.parameters())
    running = sum(b.numel() for name, b in network.named_buffers() if not name.endswith("num_batches_tracked"))
    assert params == 23_850_960
    assert params + running == 23_885_392  # the weight file's tensors, batch-norm running statistics included
    # torchvision's Inception-v3 (1000 classes plus AuxLogits: conv0 1x1 768->128, conv1 5x5 128->768, fc 768->1000)
    # documents 27,161,264 parameters; the shared trunk accounts for the difference exactly.
    aux = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
    assert params - (2048 * 1008 + 1008) + (2048 * 1000 + 1000) + aux == 27_161_264


def test_random_weights_load_and_return_pool_features(network, weights, monkeypatch):
    extractor = load_inception(weights)
    loaded = extractor.network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in network.state_dict().items())
    images = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    features, logits = extractor.features_and_logits(images)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and features.std() > 0
    torch.testing.assert_close(logits, features @ network.fc.weight.T)  # bias-free, as the original IS code
    torch.testing.assert_close(extractor(images), features)
    monkeypatch.setenv(WEIGHTS_ENV, str(weights))  # the environment variable names the file when no path is given
    assert load_inception(resize="legacy").name == "inception-v3-fid-legacy"


def test_weight_files_with_missing_unexpected_or_misshapen_keys_are_rejected(network, tmp_path):
    state = network.state_dict()
    missing = {k: v for k, v in state.items() if k != "Mixed_5b.branch_pool.conv.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['Mixed_5b.branch_pool.conv.weight'\]"):
        load_inception(tmp_path / "missing.safetensors")
    save_file({**state, "AuxLogits.fc.weight": torch.zeros(1000, 768)}, str(tmp_path / "aux.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys \['AuxLogits.fc.weight'\]"):
        load_inception(tmp_path / "aux.safetensors")
    save_file({**state, "fc.weight": torch.zeros(1000, 2048)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(1000, 2048\).*\(1008, 2048\)"):
        load_inception(tmp_path / "shape.safetensors")


def test_pickled_weights_need_allow_pickle(network, tmp_path):
    # batch-norm counters are optional: files written before PyTorch 0.4.1 lack them
    state = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pt_inception.pth")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_inception(tmp_path / "pt_inception.pth")
    extractor = load_inception(tmp_path / "pt_inception.pth", allow_pickle=True)
    assert torch.equal(extractor.network.fc.weight, network.fc.weight)


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    for path in (None, tmp_path / "absent.safetensors"):
        with pytest.raises(FileNotFoundError) as error:
            load_inception(path)
        assert WEIGHTS_URL in str(error.value) and WEIGHTS_ENV in str(error.value)


def test_resize_modes_legacy_follows_pytorch_fid(network):
    images = torch.randint(0, 256, (2, 3, 37, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    legacy = InceptionFeatureExtractor(network, resize="legacy")
    expected = 2 * F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(legacy.preprocess(images), expected)
    clean = InceptionFeatureExtractor(network, resize="clean")
    assert clean.name != legacy.name and "bicubic" in clean.description and "bilinear" in legacy.description
    gray = images[:, :1]
    torch.testing.assert_close(clean.preprocess(gray), clean.preprocess(gray.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match="resize='bilinear'"):
        InceptionFeatureExtractor(network, resize="bilinear")
    with pytest.raises(ValueError, match="dtype uint8"):
        clean.preprocess(images.float())


def _seven() -> torch.Tensor:
    """An MNIST-like binary digit ``(1, 1, 28, 28)``: a seven drawn in 0 and 255 only."""
    digit = torch.zeros(28, 28, dtype=torch.uint8)
    digit[5:9, 7:21] = 255  # the bar
    for row in range(9, 24):  # the stroke down to the left, 4 pixels wide
        col = 20 - (row - 9) // 2
        digit[row, col - 2 : col + 2] = 255
    return digit[None, None]


def _clean_fid_formula(size: tuple[int, int]):
    """clean-fid's ``make_resizer("PIL", False, "bicubic", size)`` written out (resize.py, clean-fid 0.1.35): each
    channel as a float32 PIL image, bicubic, clipped to [0, 255], not quantized."""

    def resize(image: np.ndarray) -> np.ndarray:  # (H, W, 3) uint8 -> (h, w, 3) float32
        channels = [
            Image.fromarray(image[..., c].astype(np.float32)).resize(size, Image.Resampling.BICUBIC) for c in range(3)
        ]
        return np.stack([np.asarray(c).clip(0, 255) for c in channels], axis=-1).astype(np.float32)

    return resize


def _clean_fid_package(size: tuple[int, int]):
    """clean-fid's own resizer, loaded from its ``resize.py`` alone: the package ``__init__`` imports torchvision."""
    spec = importlib.util.find_spec("cleanfid")  # a top-level package is found without running its __init__
    if spec is None:
        pytest.skip("clean-fid is not installed; `pip install --no-deps clean-fid` (it requires torchvision)")
    path = Path(spec.submodule_search_locations[0]) / "resize.py"
    assert "torchvision" not in path.read_text(), f"{path} imports torchvision now; compare with the formula only"
    module_spec = importlib.util.spec_from_file_location("cleanfid_resize", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.make_resizer("PIL", False, "bicubic", size)


def _random() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, 37, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("make_resizer", [_clean_fid_formula, _clean_fid_package], ids=["formula", "clean-fid"])
@pytest.mark.parametrize(
    ("make_images", "overshoot"), [pytest.param(_seven, 0.1, id="digit"), pytest.param(_random, 0.005, id="random")]
)
def test_clean_resize_is_clean_fids_and_clips_the_bicubic_overshoot(network, make_resizer, make_images, overshoot):
    images, resize = make_images(), make_resizer((299, 299))
    rgb = images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
    expected = torch.from_numpy(np.stack([resize(image) for image in rgb])).permute(0, 3, 1, 2)
    torch.testing.assert_close(InceptionFeatureExtractor(network).preprocess(images), expected / 127.5 - 1)
    # the inputs reach the clip: unclipped, bicubic rings past [0, 255] (around the digit's strokes by ~48 levels)
    bicubic = (Image.fromarray(c.astype(np.float32)).resize((299, 299), Image.Resampling.BICUBIC) for c in rgb[..., 0])
    unclipped = np.stack([np.asarray(image) for image in bicubic])
    assert ((unclipped < 0) | (unclipped > 255)).mean() > overshoot


def test_fid_pooling_quirks(network):
    """Average pools ignore the padding; Mixed_7c pools its last branch with a max pool."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, channels, pool in [
            ("Mixed_5b", 192, "avg"),
            ("Mixed_6b", 768, "avg"),
            ("Mixed_7b", 1280, "avg"),
            ("Mixed_7c", 2048, "max"),
        ]:
            block = getattr(network, name)
            x = torch.randn(1, channels, 5, 5, generator=generator).relu()
            pooled = {
                "avg": F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False),
                "max": F.max_pool2d(x, 3, stride=1, padding=1),
            }[pool]
            out = block(x)[:, -block.branch_pool.conv.out_channels :]
            torch.testing.assert_close(out, block.branch_pool(pooled), msg=name)
            with_padding = block.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
            assert not torch.allclose(out, with_padding), name
