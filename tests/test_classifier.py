import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unnoise.data import MNIST
from unnoise.models.classifier import (
    SHIPPED_WEIGHTS,
    DigitClassifier,
    DigitClassifierConfig,
    load_classifier,
    prepare_digits,
)
from unnoise.models.io import load_model, save_model
from unnoise.train.classifier import ClassifierTrainConfig, augment, evaluate, learning_rate, train_classifier

TINY = DigitClassifierConfig(channels=(4, 8), norm_groups=2, feature_dim=16)


def _tiny(seed: int = 0) -> DigitClassifier:
    torch.manual_seed(seed)
    return DigitClassifier(TINY).eval()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("in_channels", 0, "in_channels=0"),
        ("num_classes", 1, "an int >= 2"),
        ("channels", (), "non-empty tuple"),
        ("channels", (16, 12), "multiples of norm_groups=8"),
        ("channels", [16, 32], "non-empty tuple"),
        ("size", 30, "a multiple of 4"),
        ("feature_dim", True, "feature_dim=True"),
    ],
)
def test_model_config_errors_name_field_and_value(field, value, message):
    with pytest.raises(ValueError, match=f"DigitClassifierConfig.{field}=.*") as err:
        DigitClassifierConfig(**{field: value})
    assert message in str(err.value)


def test_model_config_json_round_trip(tmp_path):
    TINY.save(tmp_path / "config.json")
    assert DigitClassifierConfig.load(tmp_path / "config.json") == TINY


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("batch_size", 1.5), ("warmup_steps", 20), ("lr", 0.0), ("max_scale", 1.0), ("seed", -1)],
)
def test_train_config_errors_name_field_and_value(field, value):
    with pytest.raises(ValueError, match=f"ClassifierTrainConfig.{field}={value!r} is not allowed"):
        ClassifierTrainConfig(**{"steps": 20, "warmup_steps": 2, field: value})


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = _tiny()
    save_model(model, tmp_path / "clf")
    assert json.loads((tmp_path / "clf" / "config.json").read_text())["_type"] == "digit_classifier"
    loaded = load_classifier(tmp_path / "clf")
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert isinstance(loaded, DigitClassifier) and not loaded.training
    assert torch.equal(loaded(x), model(x)) and torch.equal(loaded.features(x), model.features(x))
    assert loaded.features(x).shape == (3, 16)


def test_load_classifier_rejects_other_models(tmp_path):
    from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig

    vae = AutoencoderKLConfig(block_out_channels=(8,), norm_num_groups=4, sample_size=8, in_channels=1, out_channels=1)
    save_model(AutoencoderKL(vae), tmp_path / "vae")
    with pytest.raises(ValueError, match="holds a AutoencoderKL, not a DigitClassifier"):
        load_classifier(tmp_path / "vae")


def test_prepare_digits_center_crops():
    images = torch.arange(2 * 32 * 32, dtype=torch.float32).reshape(2, 1, 32, 32)
    cropped = prepare_digits(images)
    assert cropped.shape == (2, 1, 28, 28)
    assert cropped[0, 0, 0, 0] == 2 * 32 + 2 and cropped[1, 0, -1, -1] == 32 * 32 + 29 * 32 + 29
    assert torch.equal(prepare_digits(images[..., 2:-2, 2:-2]), images[..., 2:-2, 2:-2])


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 1, 26, 26), "26 x 26 pixels"),
        ((2, 1, 31, 31), "31 x 31 pixels"),
        ((2, 1, 32, 30), "square"),
        ((32, 32), "square"),
    ],
)
def test_prepare_digits_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        prepare_digits(torch.zeros(shape))


def test_forward_rejects_uncropped_images_and_predict_crops_them():
    model = _tiny()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    with pytest.raises(ValueError, match=r"expects images \(B, 1, 28, 28\), got \(4, 1, 32, 32\); crop"):
        model(padded)
    predicted = model.predict(padded)
    assert predicted.dtype == torch.int64 and torch.equal(predicted, model(x).argmax(1))


def test_eval_outputs_do_not_depend_on_the_batch():
    model = _tiny()
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    together = model(x)
    alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
    mixed = model(torch.cat([x[:3], torch.zeros(5, 1, 28, 28)]))[:3]
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed, together[:3], rtol=0, atol=1e-5)


def test_augment_without_jitter_is_the_identity_and_pads_with_background():
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    still = ClassifierTrainConfig(max_shift=0.0, max_rotation=0.0, max_scale=0.0)
    torch.testing.assert_close(augment(x, np.random.default_rng(0), still), x, rtol=0, atol=1e-5)
    shifted = augment(x, np.random.default_rng(0), ClassifierTrainConfig(max_shift=8.0))
    assert shifted.min() >= -1 - 1e-6 and not torch.allclose(shifted, x)
    blank = augment(-torch.ones(2, 1, 28, 28), np.random.default_rng(0), ClassifierTrainConfig(max_rotation=45.0))
    torch.testing.assert_close(blank, -torch.ones(2, 1, 28, 28))


def test_learning_rate_warms_up_then_decays_to_zero():
    config = ClassifierTrainConfig(steps=10, warmup_steps=2, lr=1.0)
    rates = [learning_rate(step, config) for step in range(10)]
    assert rates[:3] == [0.5, 1.0, 1.0] and all(a >= b for a, b in zip(rates[1:], rates[2:]))
    assert 0 < rates[-1] < 0.05


def test_tiny_training_run_is_deterministic(tmp_path):
    config = ClassifierTrainConfig(model=TINY, steps=3, warmup_steps=1, batch_size=8, log_every=1)
    lines = []
    first = train_classifier(config, tmp_path / "a", log=lines.append)
    second = train_classifier(config, tmp_path / "b", log=lambda line: None)
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    for key in ("val_accuracy", "per_digit_accuracy", "val_images", "steps", "config"):
        assert first[key] == second[key]
    written = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert written["val_images"] == 1000 and len(written["per_digit_accuracy"]) == 10
    assert written["config"]["model"]["channels"] == [4, 8]
    assert len(lines) == 4 and lines[0].startswith("step 1/3")


@pytest.mark.skipif(not (SHIPPED_WEIGHTS / "model.safetensors").exists(), reason="no shipped classifier weights")
def test_shipped_classifier_scores_at_least_98_5_percent_on_validation():
    model = load_classifier()
    val = MNIST("val", size=32)  # generated images are 32 x 32: score through the same crop
    data = val.batch(np.arange(len(val)), np.random.default_rng(0))
    scores = evaluate(model, data.images, data.labels)
    assert scores["val_images"] == 1000 and scores["val_accuracy"] >= 0.985
    assert (SHIPPED_WEIGHTS / "model.safetensors").stat().st_size < 2_000_000
