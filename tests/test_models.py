"""Model builders: exact weight counts, output shapes, width scaling, layer order, BN, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slt.config.schema import ModelConfig
from slt.errors import ConfigError
from slt.layers import MaskedConv2d, MaskedLinear, masked_layers
from slt.models import MODELS, build_model
from slt.spec import DataSpec

CIFAR = DataSpec((3, 32, 32), 10)
MNIST = DataSpec((1, 28, 28), 10)


def dense_random(model: nn.Module) -> nn.Module:
    """Install dense random frozen weights on every masked layer so forward runs.

    Kaiming-scaled: unit-std weights blow ResNet-50 up to inf in eval mode (BN running
    stats are still mean 0 / var 1 there, so nothing renormalises the activations).
    """
    for layer in masked_layers(model):
        layer.set_source(
            torch.randn(layer.weight_shape) * math.sqrt(2.0 / layer.fan_in),
            torch.ones(layer.weight_shape, dtype=torch.bool),
            searched=False,
        )
    return model


def n_weights(model: nn.Module) -> int:
    return sum(layer.numel for layer in masked_layers(model))


def build(name: str, spec: DataSpec = CIFAR, **kw: object) -> nn.Module:
    return build_model(ModelConfig(name=name, **kw), spec)  # type: ignore[arg-type]


def test_registry_names() -> None:
    assert MODELS.names() == [
        "conv2", "conv4", "conv6", "conv8", "mlp", "resnet18", "resnet20", "resnet50", "vgg16",
    ]


def test_unknown_model_suggests_name() -> None:
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        build("resnet81")


# --- exact prunable-weight counts -------------------------------------------------------


def test_lenet_300_100_count() -> None:
    assert n_weights(build("mlp", MNIST)) == 784 * 300 + 300 * 100 + 100 * 10 == 266200


def test_conv4_count() -> None:
    convs = 3 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9 + 128 * 128 * 9
    fcs = (128 * 8 * 8) * 256 + 256 * 256 + 256 * 10  # 32 -> 16 -> 8 after two pools
    assert n_weights(build("conv4")) == convs + fcs == 2_425_024


def test_conv6_count() -> None:
    convs = (3 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9 + 128 * 128 * 9
             + 128 * 256 * 9 + 256 * 256 * 9)
    fcs = (256 * 4 * 4) * 256 + 256 * 256 + 256 * 10  # 32 -> 4 after three pools
    assert n_weights(build("conv6")) == convs + fcs == 2_261_184


def test_resnet20_count() -> None:
    stem = 3 * 16 * 9
    stage1 = 6 * 16 * 16 * 9
    stage2 = 16 * 32 * 9 + 5 * 32 * 32 * 9 + 16 * 32  # last term: 1x1 shortcut
    stage3 = 32 * 64 * 9 + 5 * 64 * 64 * 9 + 32 * 64
    fc = 64 * 10
    total = stem + stage1 + stage2 + stage3 + fc
    assert n_weights(build("resnet20")) == total == 270_896


def test_resnet18_count() -> None:
    stem = 3 * 64 * 9
    stage1 = 4 * 64 * 64 * 9
    stage2 = 64 * 128 * 9 + 3 * 128 * 128 * 9 + 64 * 128
    stage3 = 128 * 256 * 9 + 3 * 256 * 256 * 9 + 128 * 256
    stage4 = 256 * 512 * 9 + 3 * 512 * 512 * 9 + 256 * 512
    fc = 512 * 10
    total = stem + stage1 + stage2 + stage3 + stage4 + fc
    assert n_weights(build("resnet18")) == total == 11_164_352


# --- forward shapes ---------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS.names())
def test_output_shape_cifar(name: str) -> None:
    model = dense_random(build(name)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *CIFAR.shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mlp", "conv2", "conv4", "conv6", "conv8", "resnet20"])
def test_output_shape_mnist(name: str) -> None:
    spec = DataSpec((1, 28, 28), 7)
    model = dense_random(build(name, spec)).eval()
    with torch.no_grad():
        out = model(torch.randn(3, *spec.shape))
    assert out.shape == (3, 7)


def test_vgg16_runs_on_28x28() -> None:
    model = dense_random(build("vgg16", MNIST)).eval()
    # 28 -> 14 -> 7 -> 3 -> 1: the fifth pool is skipped.
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    with torch.no_grad():
        assert model(torch.randn(2, *MNIST.shape)).shape == (2, 10)


def test_mlp_on_vector_data() -> None:
    spec = DataSpec((32,), 5)
    model = dense_random(build("mlp", spec, hidden=(16, 8)))
    assert [layer.weight_shape for layer in masked_layers(model)] == [(16, 32), (8, 16), (5, 8)]
    assert model(torch.randn(4, 32)).shape == (4, 5)


def test_training_mode_backward() -> None:
    """Gradients reach the input through BN in training mode (the search trains this way)."""
    model = dense_random(build("resnet20")).train()
    x = torch.randn(2, *CIFAR.shape, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# --- width multiplier -------------------------------------------------------------------


@pytest.mark.parametrize("width, c1, fc", [(2.0, 128, 512), (0.5, 32, 128), (1.0, 64, 256)])
def test_conv4_width(width: float, c1: int, fc: int) -> None:
    layers = masked_layers(build("conv4", width=width))
    assert layers[0].weight_shape == (c1, 3, 3, 3)
    assert layers[3].weight_shape == (2 * c1, 2 * c1, 3, 3)
    # classifier: hidden fc features in, num_classes out (never scaled)
    assert layers[-1].weight_shape == (10, fc)
    assert layers[-3].weight_shape == (fc, 2 * c1 * 8 * 8)


def test_width_never_below_one() -> None:
    layers = masked_layers(build("mlp", MNIST, width=0.001))
    assert [layer.weight_shape for layer in layers] == [(1, 784), (1, 1), (10, 1)]


def test_resnet_width_scales_stem_and_classifier() -> None:
    layers = masked_layers(build("resnet50", width=0.5))
    assert layers[0].weight_shape == (32, 3, 3, 3)
    assert layers[-1].weight_shape == (10, 256 * 4)  # 512 * 0.5 planes, expansion 4


# --- layer order ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS.names())
def test_first_and_last_layer(name: str) -> None:
    spec = DataSpec((3, 32, 32), 13)
    layers = masked_layers(build(name, spec))
    first, last = layers[0], layers[-1]
    if name == "mlp":
        assert isinstance(first, MaskedLinear) and first.weight_shape[1] == 3 * 32 * 32
    else:
        assert isinstance(first, MaskedConv2d) and first.weight_shape[1] == 3
    assert isinstance(last, MaskedLinear) and last.weight_shape[0] == 13


def test_resnet18_shortcut_after_main_convs() -> None:
    model = build("resnet18")
    block = model.layers[1][0]  # first block of stage 2: stride 2, 64 -> 128
    order = masked_layers(model)
    main1, main2 = order.index(block.conv1), order.index(block.conv2)
    sc = order.index(block.shortcut[0])
    assert main1 + 1 == main2 and main2 + 1 == sc
    assert block.shortcut[0].weight_shape == (128, 64, 1, 1)
    assert block.shortcut[0].stride == 2
    # stage-1 blocks keep the shape: identity shortcuts, no masked layer
    assert isinstance(model.layers[0][0].shortcut, nn.Identity)


def test_masked_layers_follow_forward_order() -> None:
    """Hook every masked layer: the order they run in equals masked_layers' order."""
    for name in ("resnet20", "resnet50", "vgg16", "conv6"):
        model = dense_random(build(name)).eval()
        ran: list[nn.Module] = []

        def record(module: nn.Module, *_: object, ran: list[nn.Module] = ran) -> None:
            ran.append(module)

        hooks = [m.register_forward_hook(record) for m in masked_layers(model)]
        with torch.no_grad():
            model(torch.randn(1, *CIFAR.shape))
        for h in hooks:
            h.remove()
        assert ran == masked_layers(model), name


# --- BatchNorm and errors ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "resnet20", "resnet50"])
def test_batchnorm_affine_flag(name: str) -> None:
    plain = [m for m in build(name).modules() if isinstance(m, nn.BatchNorm2d)]
    assert plain and all(not bn.affine and bn.weight is None for bn in plain)
    affine = [m for m in build(name, bn_affine=True).modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(affine) == len(plain) and all(bn.affine and bn.weight is not None for bn in affine)


@pytest.mark.parametrize("name", ["mlp", "conv2", "conv4", "conv6", "conv8"])
def test_no_batchnorm_in_mlp_and_conv(name: str) -> None:
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in build(name).modules())


@pytest.mark.parametrize("name", ["conv4", "vgg16", "resnet20"])
def test_image_model_on_vector_data(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(name, DataSpec((32,), 10))
    assert str(err.value) == f"model {name} needs image data (C, H, W); data gives shape (32,)"


def test_conv8_on_too_small_images() -> None:
    with pytest.raises(ConfigError, match="at least 16x16"):
        build("conv8", DataSpec((3, 8, 8), 10))
