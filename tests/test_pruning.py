import json
import random
import subprocess
import sys

import pytest
import torch
from torch import nn

from geoprune_ray.core import artifact, pruning
from geoprune_ray.core.artifact import ModelCard, load_pruned, save_pruned
from geoprune_ray.core.models import build_model, classifier_head
from geoprune_ray.core.pruning import IMPORTANCES, dependency_groups, kept_channels, macs_params, prune_copy
from geoprune_ray.errors import GeopruneError

SHAPE = (3, 32, 32)
# The paper's three models (narrow, for CPU) and three torchvision classifiers.
MODELS = [("resnet18", 0.25), ("resnet50", 0.25), ("mobilenet_v2", 0.5),
          ("torchvision:vgg11_bn", 1.0), ("torchvision:resnet34", 1.0), ("torchvision:efficientnet_b0", 1.0)]


def _conv_out_channels(model):
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Each model pruned at random per-group ratios, saved, with inputs and the logits it gave."""
    root = tmp_path_factory.mktemp("pruned")
    rng = random.Random(0)
    records = []
    for arch, width in MODELS:
        torch.manual_seed(0)
        model = build_model(arch, 10, width=width).eval()
        groups = dependency_groups(model, SHAPE, 10)
        ratios = {g.name: rng.uniform(0.05, 0.7) for g in groups}
        pruned, history = prune_copy(model, ratios, SHAPE, 10)
        pruned.eval()
        x = torch.randn(4, *SHAPE)
        with torch.no_grad():
            logits = pruned(x)
        card = ModelCard(arch, 10, 3, width, SHAPE, (0.5,) * 3, (0.25,) * 3)
        save_pruned(root / arch.replace(":", "_"), pruned, history, card)
        torch.save({"x": x, "logits": logits}, root / (arch.replace(":", "_") + ".io.pt"))
        records.append((arch, width, model, pruned, groups, ratios))
    return root, records


def test_random_ratios_forward_and_shrink(saved_models):
    _, records = saved_models
    for arch, _width, model, pruned, groups, ratios in records:
        base_macs, base_params = macs_params(model, SHAPE)
        macs, params = macs_params(pruned, SHAPE)
        assert macs < base_macs and params < base_params, arch
        assert pruned(torch.randn(2, *SHAPE)).shape == (2, 10), arch
        # every group lost the channels its ratio asked for (≥ 1 kept)
        after = {g.name: g.channels for g in dependency_groups(pruned, SHAPE, 10)}
        for g in groups:
            assert after[g.name] == kept_channels(g.channels, ratios[g.name]), (arch, g.name)


@pytest.mark.parametrize("arch,width", MODELS)
def test_macs_fall_as_ratio_grows(arch, width):
    model = build_model(arch, 10, width=width).eval()
    macs = [macs_params(model, SHAPE)[0]]
    for r in (0.2, 0.5):
        pruned, _ = prune_copy(model, r, SHAPE, 10)
        macs.append(macs_params(pruned, SHAPE)[0])
    assert macs[0] > macs[1] > macs[2], (arch, macs)


def test_load_pruned_in_fresh_process_reproduces_logits(saved_models):
    root, records = saved_models
    script = f"""
import sys, torch
from geoprune_ray.core.artifact import load_pruned
worst = 0.0
for name in {[arch.replace(':', '_') for arch, *_ in records]!r}:
    model, card = load_pruned({str(root)!r} + '/' + name)
    io = torch.load({str(root)!r} + '/' + name + '.io.pt', weights_only=True)
    with torch.no_grad():
        out = model.eval()(io['x'])
    worst = max(worst, (out - io['logits']).abs().max().item())
print(worst)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-4


def test_saved_artifact_is_plain_data(saved_models):
    root, _ = saved_models
    folder = root / "resnet18"
    payload = torch.load(folder / "model.pt", weights_only=True)  # no arbitrary unpickling
    assert payload["card"]["arch"] == "resnet18" and payload["pruning_history"]
    meta = json.loads((folder / "model.json").read_text())
    assert meta["macs"] > 0 and meta["card"]["input_shape"] == list(SHAPE)
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "no staging folder left behind"


def test_load_with_base_model_for_unnamed_architectures(tmp_path):
    model = build_model("convnet", 10).eval()
    pruned, history = prune_copy(model, 0.4, SHAPE, 10)
    save_pruned(tmp_path / "m", pruned, history, ModelCard("", 10, 3, 1.0, SHAPE, (0.5,) * 3, (0.2,) * 3))
    with pytest.raises(GeopruneError, match="base_model"):
        load_pruned(tmp_path / "m")
    loaded, _ = load_pruned(tmp_path / "m", base_model=build_model("convnet", 10))
    x = torch.randn(2, *SHAPE)
    assert torch.allclose(loaded.eval()(x), pruned.eval()(x), atol=1e-5)


def test_groups_are_named_stably_and_classifier_is_never_pruned():
    a = dependency_groups(build_model("resnet18", 10, width=0.25), SHAPE, 10)
    b = dependency_groups(build_model("resnet18", 10, width=0.25), SHAPE, 10)
    assert a == b and len(a) == 12
    assert {g.name for g in a} >= {"conv1", "layer1.0.conv1", "layer4.1.conv1"}
    assert next(g for g in a if g.name == "conv1").modules > 4  # the residual stream couples many layers
    pruned, _ = prune_copy(build_model("resnet18", 10, width=0.25), 0.95, SHAPE, 10)
    _, head = classifier_head(pruned, 10)
    assert head.out_features == 10
    assert min(_conv_out_channels(pruned).values()) >= 1


def test_ratio_zero_prunes_nothing_and_round_to_is_respected():
    model = build_model("resnet18", 10, width=0.5)
    same, history = prune_copy(model, 0.0, SHAPE, 10)
    assert history == [] and _conv_out_channels(same) == _conv_out_channels(model)
    rounded, _ = prune_copy(model, 0.3, SHAPE, 10, round_to=8)
    base = _conv_out_channels(model)
    for name, kept in _conv_out_channels(rounded).items():  # groups of 32 channels or more: multiples of 8
        assert kept % 8 == 0 or base[name] < 32, (name, base[name], kept)
    assert kept_channels(5, 0.99) == 1 and kept_channels(64, 0.0, 8) == 64


def test_round_to_rounds_to_the_nearest_multiple_in_groups_of_four_multiples_or_more():
    """METHOD.md §5: the nearest multiple (a half rounds up, keeping more), only where n ≥ 4 × round_to, never
    below one multiple; round_to 1 or None rounds nothing."""
    assert kept_channels(64, 0.3, 8) == 48  # keeps 45 → 48, not 40 (rounding down)
    assert kept_channels(64, 0.36, 8) == 40  # keeps 41 → 40
    assert kept_channels(64, 0.4375, 8) == 40  # keeps 36, a half: up to 40
    assert kept_channels(31, 0.3, 8) == 22  # 31 < 32: not rounded
    assert kept_channels(32, 0.9, 8) == 8  # keeps 3 → at least one multiple
    assert kept_channels(40, 0.1, 8) == 40  # keeps 36 → 40: the group is not pruned
    assert kept_channels(64, 0.3, 1) == kept_channels(64, 0.3, None) == 45


@pytest.mark.parametrize("name", sorted(IMPORTANCES))
def test_every_importance_criterion_prunes(name):
    model = build_model("convnet", 10, width=0.5)
    pruned, history = prune_copy(model, 0.5, SHAPE, 10, importance_name=name)
    assert history and macs_params(pruned, SHAPE)[0] < macs_params(model, SHAPE)[0]


@pytest.mark.parametrize("ratios", [1.0, -0.1, {"0": 1.2}])
def test_ratios_outside_unit_interval_are_refused(ratios):
    with pytest.raises(GeopruneError, match=r"outside \[0, 1\)"):
        prune_copy(build_model("convnet", 10), ratios, SHAPE, 10)


def test_unknown_group_and_importance_are_refused():
    model = build_model("convnet", 10)
    with pytest.raises(GeopruneError, match="unknown pruning groups"):
        prune_copy(model, {"nope": 0.2}, SHAPE, 10)
    with pytest.raises(GeopruneError, match="unknown importance"):
        prune_copy(model, 0.2, SHAPE, 10, importance_name="oracle")


def test_loading_a_foreign_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "geoprune-ray/pruned-model", "x": Evil()}, tmp_path / "model.pt")
    with pytest.raises(GeopruneError, match="cannot load .* safely"):
        load_pruned(tmp_path)


def test_the_artifact_names_are_still_importable_from_pruning():
    """Their home is core.artifact; core.pruning keeps them for one release (issue 14)."""
    from geoprune_ray.core.pruning import ModelCard as Card, load_pruned as load, save_pruned as save

    assert (Card, load, save) == (artifact.ModelCard, artifact.load_pruned, artifact.save_pruned)
    assert (pruning.ARTIFACT_FORMAT, pruning.ARTIFACT_VERSION) == (artifact.ARTIFACT_FORMAT, artifact.ARTIFACT_VERSION)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pruning.nope
