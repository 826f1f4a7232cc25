"""Model registry, the two seed networks, KWSModel and the summary counts."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from kws_lightning.models import MODELS, available_models, build_model, hyperparameters, register_model
from kws_lightning.models.cnn_trad_pool2 import CNNTradPool2
from kws_lightning.models.kws_model import KWSModel
from kws_lightning.models.light_cnn import LightCNN
from kws_lightning.models.shapes import min_input_hw
from kws_lightning.models.summary import count_macs, count_parameters

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
MFCC_SHAPE = (1, 101, 40)
SPEC_8K_SHAPE = (1, 99, 81)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- cnn_trad_pool2 ---------------------------------------------------------------------------------------


def test_cnn_trad_pool2_has_honks_parameter_count():
    model = build_model("cnn_trad_pool2", MFCC_SHAPE, 12)
    assert isinstance(model, CNNTradPool2)
    assert n_params(model) == 493_708
    # 64 maps x (32 time x 13 freq) after conv2, as in honk.
    assert model.classifier.in_features == 64 * 32 * 13


@pytest.mark.parametrize(
    ("input_shape", "flat"),
    [
        ((1, 101, 40), 64 * 32 * 13),  # 40 log-mel bands: same shape as 40 MFCCs
        ((1, 51, 40), 64 * 7 * 13),  # 0.5 s clip: conv1 -> 32, pool -> 16, conv2 -> 7
        ((1, 98, 64), 64 * 30 * 25),  # another front end
    ],
)
def test_cnn_trad_pool2_derives_linear_width_from_input_shape(input_shape, flat):
    model = build_model("cnn_trad_pool2", input_shape, 12).eval()
    assert model.classifier.in_features == flat
    with torch.no_grad():
        assert model(torch.randn(3, *input_shape)).shape == (3, 12)


def test_cnn_trad_pool2_minimum_input_is_exact():
    # conv2 needs 10x4, so pool needs 20x8, so conv1 needs 39x15.
    assert min_input_hw(build_model("cnn_trad_pool2", MFCC_SHAPE, 12).features) == (39, 15)
    build_model("cnn_trad_pool2", (1, 39, 15), 12)  # exactly the minimum builds
    with pytest.raises(ValueError, match=r"\(1, 38, 40\).*at least \(1, 39, 15\)"):
        build_model("cnn_trad_pool2", (1, 38, 40), 12)
    with pytest.raises(ValueError, match=r"\(1, 101, 14\).*at least \(1, 39, 15\)"):
        build_model("cnn_trad_pool2", (1, 101, 14), 12)


def test_cnn_trad_pool2_dropout_placement():
    model = build_model("cnn_trad_pool2", MFCC_SHAPE, 12)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["Conv2d", "MaxPool2d", "ReLU", "Identity", "Conv2d", "ReLU", "Dropout"]
    honk = build_model("cnn_trad_pool2", MFCC_SHAPE, 12, conv1_dropout=True)
    assert [type(m).__name__ for m in honk.features][:4] == ["Conv2d", "ReLU", "Dropout", "MaxPool2d"]
    assert n_params(honk) == 493_708


def test_cnn_trad_pool2_pools_before_relu_with_the_papers_outputs_and_gradients():
    """Pool-then-ReLU (the faster order) equals the paper's conv -> ReLU -> pool, forward and backward."""
    torch.manual_seed(0)
    model = build_model("cnn_trad_pool2", MFCC_SHAPE, 12).eval()
    conv1, conv2 = model.features[0], model.features[4]
    x = torch.randn(3, *MFCC_SHAPE)
    reference_input = x.clone().requires_grad_(True)
    hidden = torch.relu(conv2(nn.functional.max_pool2d(torch.relu(conv1(reference_input)), (2, 2))))
    reference = model.classifier(hidden.flatten(1))
    reference.sum().backward()
    reference_grad = conv1.weight.grad.clone()
    model.zero_grad()
    ours_input = x.clone().requires_grad_(True)
    ours = model(ours_input)
    ours.sum().backward()
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(conv1.weight.grad, reference_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_input.grad, reference_input.grad, rtol=1e-5, atol=1e-6)


def test_cnn_trad_pool2_rejects_wrong_feature_shape_at_forward():
    model = build_model("cnn_trad_pool2", MFCC_SHAPE, 12)
    with pytest.raises(ValueError, match=r"built for inputs \(B, 1, 101, 40\), got \(2, 1, 98, 40\)"):
        model(torch.zeros(2, 1, 98, 40))


# --- light_cnn --------------------------------------------------------------------------------------------


def test_light_cnn_parameter_count_and_layers():
    model = build_model("light_cnn", SPEC_8K_SHAPE, 12)
    assert isinstance(model, LightCNN)
    assert n_params(model) == 313_854
    # Keras' summary also counts BatchNorm moving mean/variance: 2 + 128*2 + 128*2.
    stats = sum(
        b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))
    )
    assert n_params(model) + stats == 314_368
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [
        (8, (2, 2)),
        (8, (2, 2)),
        (16, (3, 3)),
        (16, (3, 3)),
        (32, (3, 3)),
    ]
    assert model.classifier[0].in_features == 32 * 10 * 7
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 3
    assert all(n.momentum == pytest.approx(0.01) and n.eps == pytest.approx(1e-3) for n in norms)
    assert all(not c.bias.detach().any() for c in convs)  # Keras init: zero biases


def test_light_cnn_forward_and_too_small_input():
    model = build_model("light_cnn", SPEC_8K_SHAPE, 12).eval()
    with torch.no_grad():
        assert model(torch.randn(4, *SPEC_8K_SHAPE)).shape == (4, 12)
    # pool needs 2 <- conv 3x3 needs 4 <- pool 8 <- convs 12 <- pool 24 <- convs 2x2 need 26.
    assert min_input_hw(model.features) == (26, 26)
    build_model("light_cnn", (1, 26, 26), 12)
    with pytest.raises(ValueError, match=r"light_cnn.*\(1, 25, 81\).*at least \(1, 26, 26\)"):
        build_model("light_cnn", (1, 25, 81), 12)
    with pytest.raises(ValueError, match="same length"):
        build_model("light_cnn", SPEC_8K_SHAPE, 12, channels=[8, 16])


# --- training ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "input_shape", "hparams"),
    [
        # Narrow cnn_trad_pool2 keeps the test fast; dropout off so the before/after losses compare the
        # same function (BatchNorm stays in training mode, as during the steps).
        ("cnn_trad_pool2", MFCC_SHAPE, {"n_feature_maps": 8, "dropout": 0.0}),
        ("light_cnn", SPEC_8K_SHAPE, {"dropout": 0.0}),
    ],
)
def test_sgd_steps_lower_the_loss_on_a_fixed_batch(name, input_shape, hparams):
    torch.manual_seed(0)
    model = build_model(name, input_shape, 12, **hparams).train()
    features = torch.randn(16, *input_shape)
    targets = torch.arange(16) % 12
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def current_loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(features), targets))

    before = current_loss()
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(features), targets).backward()
        optimizer.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    after = current_loss()
    assert after < 0.95 * before, (before, after)


# --- registry ---------------------------------------------------------------------------------------------


def test_registry_lists_both_seed_models():
    assert {"cnn_trad_pool2", "light_cnn"} <= set(available_models())
    assert available_models() == sorted(MODELS)
    assert hyperparameters("cnn_trad_pool2")["conv1_kernel"] == (20, 8)


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'cnn_trad'.*cnn_trad_pool2.*light_cnn"):
        build_model("cnn_trad", MFCC_SHAPE, 12)


def test_unknown_hyperparameter_names_model_and_accepted_parameters():
    with pytest.raises(TypeError, match=r"cnn_trad_pool2.*\['n_featuremaps'\].*n_feature_maps"):
        build_model("cnn_trad_pool2", MFCC_SHAPE, 12, n_featuremaps=32)


@pytest.mark.parametrize("bad_shape", [(101, 40), (1, 0, 40), (1, 101.5, 40), "abc", "123", None])
def test_bad_input_shape_is_a_clear_error(bad_shape):
    with pytest.raises(ValueError, match="input_shape must be"):
        build_model("cnn_trad_pool2", bad_shape, 12)


def test_bad_num_classes_is_a_clear_error():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("cnn_trad_pool2", MFCC_SHAPE, 0)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):

        @register_model("cnn_trad_pool2")
        class Impostor(nn.Module):
            def __init__(self, input_shape, num_classes):
                super().__init__()

    assert MODELS["cnn_trad_pool2"] is CNNTradPool2


# --- hydra configs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "input_shape", "count"),
    [
        ("cnn_trad_pool2", MFCC_SHAPE, 493_708),
        ("light_cnn", SPEC_8K_SHAPE, 313_854),
        ("res15", MFCC_SHAPE, 237_882),
        ("res8", MFCC_SHAPE, 110_307),
        ("res8_narrow", MFCC_SHAPE, 19_905),
        ("ds_cnn", MFCC_SHAPE, 23_180),
        ("tc_resnet8", MFCC_SHAPE, 65_168),
        ("tc_resnet14", MFCC_SHAPE, 135_856),
        ("matchboxnet", MFCC_SHAPE, 87_108),
        ("bc_resnet", MFCC_SHAPE, 9_232),
    ],
)
def test_hydra_config_instantiates_a_partial_that_builds_the_model(name, input_shape, count):
    cfg = OmegaConf.load(CONF_MODEL / f"{name}.yaml")
    assert cfg.name == name
    factory = instantiate(cfg)
    assert isinstance(factory, functools.partial)
    model = factory(input_shape=input_shape, num_classes=12)
    assert type(model) is MODELS[name]
    assert n_params(model) == count
    # Config lists arrive as ListConfig; the model must hold plain Python values only, so a pickled
    # checkpoint does not depend on OmegaConf.
    assert b"omegaconf" not in pickle.dumps(model)


def test_config_keys_match_the_model_defaults():
    # The yaml of every registered model states every hyper-parameter, with the class defaults (so the
    # docstring figures hold).
    assert sorted(p.stem for p in CONF_MODEL.glob("*.yaml")) == sorted(available_models())
    for name in available_models():
        cfg = OmegaConf.to_container(OmegaConf.load(CONF_MODEL / f"{name}.yaml"))
        hparams = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "name"}
        defaults = hyperparameters(name)
        assert set(hparams) == set(defaults), name
        for key, value in hparams.items():
            expected = defaults[key]
            if isinstance(expected, tuple):
                expected = [list(e) if isinstance(e, tuple) else e for e in expected]
            assert value == expected, (name, key)


# --- KWSModel ---------------------------------------------------------------------------------------------


class ReshapeFrontend(nn.Module):
    """(B, 16000) waves -> (B, 1, 100, 160) frames: a stand-in for kws_lightning.features."""

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        return waves.reshape(waves.shape[0], 1, 100, 160)


def test_kws_model_end_to_end_from_raw_audio():
    torch.manual_seed(0)
    net = build_model("cnn_trad_pool2", (1, 100, 160), 12, n_feature_maps=8)
    model = KWSModel(ReshapeFrontend(), net)
    waves = torch.rand(3, 16000) * 2 - 1
    logits = model(waves)
    assert logits.shape == (3, 12)
    logits.sum().backward()
    assert net.features[0].weight.grad is not None
    model.eval()
    probs = model.predict_proba(waves)
    assert probs.shape == (3, 12)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(3))
    assert torch.equal(probs.argmax(-1), model(waves).argmax(-1))
    # Frontend and net are submodules, so one state_dict carries both.
    assert {k.split(".")[0] for k in model.state_dict()} == {"net"}  # this frontend has no weights
    with pytest.raises(ValueError, match=r"\(batch, samples\).*\(16000,\)"):
        model(waves[0])


# --- summary ----------------------------------------------------------------------------------------------


def test_counts_match_hand_arithmetic():
    model = build_model("cnn_trad_pool2", MFCC_SHAPE, 12)
    assert count_parameters(model) == 493_708
    conv1 = 64 * 82 * 33 * (1 * 20 * 8)
    conv2 = 64 * 32 * 13 * (64 * 10 * 4)
    linear = 12 * 64 * 32 * 13
    assert count_macs(model, MFCC_SHAPE) == conv1 + conv2 + linear == 96_186_368
    assert count_macs(build_model("light_cnn", SPEC_8K_SHAPE, 12), SPEC_8K_SHAPE) == 9_408_512


def test_count_macs_leaves_modes_and_batchnorm_statistics_alone():
    model = build_model("light_cnn", SPEC_8K_SHAPE, 12).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, SPEC_8K_SHAPE)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert count_parameters(model, trainable_only=True) == 313_854
    for p in model.features.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 313_854 - 2 - 40 - 264 - 1168 - 2320 - 4640


def test_count_macs_of_kws_model_on_raw_audio():
    net = build_model("cnn_trad_pool2", (1, 100, 160), 12, n_feature_maps=8)
    model = KWSModel(ReshapeFrontend(), net)
    assert count_macs(model, (16000,)) == count_macs(net, (1, 100, 160)) > 0


@pytest.mark.parametrize(
    ("frontend_name", "model_name", "input_shape"),
    [("MFCC", "cnn_trad_pool2", MFCC_SHAPE), ("LogSpectrogram", "light_cnn", SPEC_8K_SHAPE)],
)
def test_seed_pairings_with_the_real_front_ends(frontend_name, model_name, input_shape):
    features = pytest.importorskip("kws_lightning.features")
    frontend = getattr(features, frontend_name)()
    assert features.output_shape(frontend) == input_shape  # the seeds' default input shapes
    model = KWSModel(frontend, build_model(model_name, features.output_shape(frontend), 12)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 16000) * 2 - 1).shape == (2, 12)
