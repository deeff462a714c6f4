"""ViTConfig.conv_stem: a small 3x3 conv + BatchNorm + GELU stem in place of the patchify (hybrid for small images)."""
import numpy as np
import pytest
import torch

import vitkit
from vitkit.models.vit import ViTConfig

TINY = dict(img_size=32, width=32, depth=1, num_heads=2, mlp_dim=64, num_classes=10, class_token=False, pool="gap")


def test_each_widening_layer_halves_the_resolution():
    cfg = ViTConfig(patch_size=1, conv_stem=(8, 16, 24), **TINY)
    assert cfg.reduction == 4 and cfg.grid == (8, 8)
    model = vitkit.ViT(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.patch_embed(x).shape == (2, 32, 8, 8)
    assert model.forward_features(x).shape == (2, 64, 32)
    assert model(x).shape == (2, 10)
    sd = model.state_dict()
    assert sd["patch_embed.backbone.0.conv.weight"].shape == (8, 3, 3, 3)
    assert sd["patch_embed.backbone.2.conv.weight"].shape == (24, 16, 3, 3)
    assert sd["patch_embed.backbone.2.bn.running_var"].shape == (24,)
    assert sd["patch_embed.proj.weight"].shape == (32, 24, 1, 1)
    # patch_size still applies on top of the stem, as for the ResNet hybrid
    assert ViTConfig(patch_size=2, conv_stem=(8, 16, 24), **TINY).grid == (4, 4)


def test_the_stem_downsamples_with_strided_convs():
    stem = vitkit.ViT(ViTConfig(patch_size=1, conv_stem=(4, 4), **TINY)).patch_embed.backbone  # same width: stride 1
    assert [layer.conv.stride[0] for layer in stem] == [1, 1]
    stem = vitkit.ViT(ViTConfig(patch_size=1, conv_stem=(4, 8, 8, 16, 16), **TINY)).patch_embed.backbone
    assert [layer.conv.stride[0] for layer in stem] == [1, 2, 1, 2, 1]
    assert ViTConfig(patch_size=2, conv_stem=(4, 8, 8, 16, 16), **TINY).grid == (4, 4)


def test_pooling_stem_convolves_at_full_resolution_then_max_pools(tmp_path):
    cfg = ViTConfig(patch_size=1, conv_stem=(4, 8, 8), conv_stem_pool=True, **TINY)
    assert cfg.grid == (16, 16)
    model = vitkit.ViT(cfg).eval()
    stem = model.patch_embed.backbone
    assert [layer.conv.stride[0] for layer in stem] == [1, 1, 1]
    for layer in stem:  # BatchNorm statistics away from the identity, so the reference below tests their use
        torch.nn.init.uniform_(layer.bn.running_mean, -1, 1), torch.nn.init.uniform_(layer.bn.running_var, 0.5, 2)
    x = torch.randn(2, 3, 32, 32)

    def reference(x, layer, pool):  # conv -> 2x2 max-pool -> BatchNorm -> GELU, written out with torch.nn.functional
        x = torch.nn.functional.conv2d(x, layer.conv.weight, padding=1)
        x = torch.nn.functional.max_pool2d(x, 2) if pool else x
        bn = layer.bn
        return torch.nn.functional.gelu(torch.nn.functional.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps))

    expected = reference(reference(reference(x, stem[0], False), stem[1], True), stem[2], False)
    torch.testing.assert_close(stem(x), expected)
    assert model(x).shape == (2, 10)
    loaded = vitkit.load_model(vitkit.save_model(model, tmp_path / "pool.safetensors"))
    assert loaded.cfg.conv_stem_pool is True
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    strided = vitkit.ViT(ViTConfig(patch_size=1, conv_stem=(4, 8, 8), **TINY)).eval()
    strided.load_state_dict(model.state_dict())  # same parameters, different downsampling
    assert not torch.allclose(strided(x), model(x))


def test_default_and_hybrid_models_are_unchanged():
    plain = vitkit.ViT(ViTConfig(patch_size=4, **TINY))
    assert ViTConfig().conv_stem is None
    assert not any("backbone" in k for k in plain.state_dict())
    hybrid = ViTConfig(patch_size=1, hybrid_layers=(1,), hybrid_width=32, **TINY)
    assert hybrid.reduction == 4 and "patch_embed.backbone.stem.conv.weight" in vitkit.ViT(hybrid).state_dict()


@pytest.mark.parametrize("bad", [dict(conv_stem=()), dict(conv_stem=(8,), hybrid_layers=(1,))])
def test_invalid_stems_are_refused(bad):
    with pytest.raises(ValueError, match="conv_stem"):
        ViTConfig(patch_size=1, **TINY, **bad)


def test_save_load_round_trip_keeps_weights_and_batchnorm_statistics(tmp_path):
    torch.manual_seed(0)
    model = vitkit.ViT(ViTConfig(patch_size=1, conv_stem=(8, 16, 24), **TINY)).train()
    model(torch.randn(8, 3, 32, 32) * 3 + 1)  # moves the BatchNorm running statistics off their defaults
    model.eval()
    path = vitkit.save_model(model, tmp_path / "stem.safetensors")
    loaded = vitkit.load_model(path)
    assert loaded.cfg.conv_stem == (8, 16, 24) and loaded.cfg.grid == (8, 8)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not torch.equal(model.patch_embed.backbone[0].bn.running_mean, torch.zeros(8))


def test_evaluation_runs_a_loaded_stem_model_channels_last_and_leaves_a_given_model_alone(tmp_path, monkeypatch):
    """evaluate_model converts a conv-stem model it loads itself to channels-last (faster convolutions, same
    numbers); a model passed in keeps its memory format, so the caller can still save it with safetensors."""
    from vitkit.train import evaluate as E

    torch.manual_seed(0)
    model = vitkit.ViT(ViTConfig(patch_size=1, conv_stem=(8, 16, 24), **TINY))
    model.class_names = [str(i) for i in range(10)]  # digits' folders
    path = vitkit.save_model(model.eval(), tmp_path / "stem.safetensors")
    seen = []
    evaluate = E.evaluate
    monkeypatch.setattr(E, "evaluate", lambda m, *a, **kw: seen.append(
        m.patch_embed.backbone[1].conv.weight.is_contiguous(memory_format=torch.channels_last)) or evaluate(m, *a, **kw))
    loaded = E.evaluate_model(path, "digits", amp="none")
    given = E.evaluate_model(model, "digits", amp="none")
    forced = E.evaluate_model(path, "digits", amp="none", channels_last=False)
    assert seen == [True, False, False]
    assert all(p.is_contiguous() for p in model.parameters())
    assert loaded.n == given.n == forced.n == 1797
    assert loaded.top1 == given.top1 == forced.top1 and torch.equal(loaded.confusion, forced.confusion)
    assert loaded.loss == pytest.approx(forced.loss, rel=1e-5)


def test_whitening_makes_the_first_filters_the_patch_principal_components():
    torch.manual_seed(0)
    stem = vitkit.ViT(ViTConfig(patch_size=1, conv_stem=(8, 16), **TINY)).patch_embed.backbone
    default_norm = stem[0].conv.weight.flatten(1).norm(dim=1).mean().item()
    # smooth, channel-correlated images: the leading components are well separated
    x = torch.nn.functional.interpolate(torch.randn(40, 3, 4, 4), size=12, mode="bilinear") + 0.1 * torch.randn(40, 3, 12, 12)
    x[:, 1] += 0.8 * x[:, 0]
    stem.whiten_(x)
    # reference: numpy's eigenvectors of the second-moment matrix of every 3x3 patch (channel, row, column order)
    patches = np.lib.stride_tricks.sliding_window_view(x.numpy(), (3, 3), axis=(2, 3))  # n, c, 10, 10, 3, 3
    patches = patches.transpose(0, 2, 3, 1, 4, 5).reshape(-1, 27).astype(np.float64)
    values, vectors = np.linalg.eigh(patches.T @ patches / len(patches))
    values, top = values[::-1], vectors[:, ::-1][:, :4].T
    assert np.all(values[:4] / values[1:5] > 1.05)  # distinct: each component is defined up to its sign
    w = stem[0].conv.weight.detach().flatten(1).numpy()
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), default_norm, rtol=1e-5)
    np.testing.assert_allclose(np.abs(w[:4] / default_norm @ top.T), np.eye(4), atol=1e-4)
    np.testing.assert_array_equal(w[4:], -w[:4])  # each with both signs: GELU keeps either half
    assert stem(x).shape == (40, 16, 6, 6)


def test_whitening_reads_a_bounded_number_of_patches():
    """About a million 3x3 patches: 1,000 images at 32 px, 20 at 224 px (not 1,000 of those: gigabytes)."""
    from vitkit.train.trainer import whiten_stem

    class Images(torch.utils.data.Dataset):
        def __init__(self, size):
            self.size, self.read = size, 0

        def __len__(self):
            return 5000

        def __getitem__(self, i):
            self.read += 1
            return torch.randint(0, 256, (3, self.size, self.size), dtype=torch.uint8), 0

    for size, expected in ((32, 1000), (224, 20)):
        model = vitkit.ViT(ViTConfig(**{**TINY, "img_size": size}, patch_size=4, conv_stem=(8, 16)))
        model.preprocess.update(crop_pct=1.0)
        before = model.patch_embed.backbone[0].conv.weight.clone()
        images = Images(size)
        assert whiten_stem(model, images, seed=0) == expected == images.read
        assert not torch.equal(model.patch_embed.backbone[0].conv.weight, before)
