import sys
import textwrap

import pytest
import torch
from torch import nn

from geoprune_ray.core.models import build_model, classifier_head, default_input_size, load_weights
from geoprune_ray.errors import GeopruneError


def test_width_multiplier_narrows_the_paper_models():
    full = build_model("resnet18", 10)
    narrow = build_model("resnet18", 10, width=0.25)
    assert narrow.conv1.out_channels == 16 and narrow.fc.in_features == 128
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in full.parameters()) / 10
    assert build_model("mobilenet_v2", 10, width=0.5)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("resnet50", 10, in_channels=1, width=0.25)(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_cifar_stem():
    model = build_model("resnet18", 100)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert build_model("mobilenet_v2", 100).features[0][0].stride == (1, 1)


def test_torchvision_models_by_name():
    model = build_model("torchvision:vgg11_bn", 7)
    assert classifier_head(model, 7)[0] == "classifier.6"
    assert default_input_size("torchvision:vgg11_bn") == 224 and default_input_size("resnet18") == 32
    with pytest.raises(GeopruneError, match="unknown torchvision model"):
        build_model("torchvision:resnet9000", 10)
    with pytest.raises(GeopruneError, match="no width multiplier"):
        build_model("torchvision:resnet34", 10, width=0.5)
    with pytest.raises(GeopruneError, match="3 input channels"):
        build_model("torchvision:resnet34", 10, in_channels=1)


def test_user_factory_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def tiny(num_classes):
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
        tiny.input_size = 12
        def broken(num_classes):
            return "not a model"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_models", None)
    assert build_model("my_models:tiny", 5)(torch.randn(1, 3, 12, 12)).shape == (1, 5)
    assert default_input_size("my_models:tiny") == 12
    with pytest.raises(GeopruneError, match="not an nn.Module"):
        build_model("my_models:broken", 5)
    with pytest.raises(GeopruneError, match="has no callable"):
        build_model("my_models:absent", 5)
    with pytest.raises(GeopruneError, match="cannot import"):
        build_model("no_such_pkg.models:net", 5)


def test_unknown_model_and_bad_arguments():
    with pytest.raises(GeopruneError, match="unknown model 'resnet7'"):
        build_model("resnet7", 10)
    with pytest.raises(GeopruneError, match="at least 2 classes"):
        build_model("resnet18", 1)
    with pytest.raises(GeopruneError, match="width"):
        build_model("resnet18", 10, width=0)


def test_load_weights_is_safe_and_strict(tmp_path):
    model = build_model("convnet", 10)
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "ddp.pt")
    fresh = load_weights(build_model("convnet", 10), tmp_path / "ddp.pt")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    torch.save(build_model("convnet", 10, width=0.5).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(GeopruneError, match="does not match the model"):
        load_weights(build_model("convnet", 10), tmp_path / "narrow.pt")
    torch.save(model, tmp_path / "pickled_module.pt")  # a whole pickled module: refused, not unpickled
    with pytest.raises(GeopruneError, match="cannot load .* safely"):
        load_weights(build_model("convnet", 10), tmp_path / "pickled_module.pt")
    with pytest.raises(GeopruneError, match="does not exist"):
        load_weights(model, tmp_path / "absent.pt")
