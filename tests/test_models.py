"""The ViT itself: architecture against timm for every released name, options, resampling, attention capture."""
import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.models import registry, resample_pos_embed

timm = pytest.importorskip("timm")


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", [n for n in vitkit.list_models() if n.startswith(("vit_", "deit_"))
                                  and not n.startswith(("vit_b_", "vit_l_", "vit_h_"))])
def test_every_timm_name_has_timms_exact_parameters(name):
    """Built on the meta device: no memory, so even ViT-H/14 is cheap."""
    with torch.device("meta"):
        ours, theirs = vitkit.create_model(name), timm.create_model(name, num_classes=1000)
    assert shapes(ours) == shapes(theirs)


@pytest.mark.parametrize("paper, timm_name, tv_name", [
    ("ViT-B/16", "vit_base_patch16_224", "vit_b_16"), ("ViT-B/32", "vit_base_patch32_224", "vit_b_32"),
    ("ViT-L/16", "vit_large_patch16_224", "vit_l_16"), ("ViT-L/32", "vit_large_patch32_224", "vit_l_32"),
    ("ViT-H/14", "vit_huge_patch14_224", "vit_h_14"),
])
def test_three_spellings_one_architecture(paper, timm_name, tv_name):
    configs = [registry.build_config(n)[0] for n in (paper, timm_name, tv_name)]
    assert configs[0] == configs[1] == configs[2]
    assert registry.resolve(tv_name)[1]["interpolation"] in ("bilinear", "bicubic")


def test_parameter_counts_match_the_paper():
    with torch.device("meta"):  # paper Table 1: 86M, 307M, 632M
        counts = {v: sum(p.numel() for p in vitkit.create_model(f"ViT-{v}").parameters()) / 1e6
                  for v in ("B/16", "L/16", "H/14")}
    assert round(counts["B/16"]) == 87 and round(counts["L/16"]) == 304 and round(counts["H/14"]) == 632


def test_unknown_name_says_where_to_look():
    with pytest.raises(ValueError, match="vitkit models"):
        vitkit.create_model("vit_gigantic_patch3")


def tiny(**kw):
    torch.manual_seed(0)
    return vitkit.create_model("ViT-Ti/16", img_size=64, depth=2, **kw).eval()


def test_resample_pos_embed_is_2d_bicubic_and_keeps_class_position():
    pos = torch.randn(1, 1 + 4 * 6, 8)
    out = resample_pos_embed(pos, (8, 3), (4, 6))
    assert out.shape == (1, 1 + 24, 8) and torch.equal(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 4, 6, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(8, 3), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 24, 8))
    assert resample_pos_embed(pos, (4, 6), (4, 6)) is pos


def test_dynamic_img_size_equals_a_model_built_at_that_size(tmp_path):
    model = tiny(dynamic_img_size=True)
    vitkit.save_model(model, tmp_path / "m.safetensors")
    other = vitkit.load_model(tmp_path / "m.safetensors", img_size=(96, 48))  # non-square, resampled at load
    x = torch.randn(2, 3, 96, 48)
    with torch.no_grad():
        assert torch.allclose(model(x), other(x), atol=1e-5)
    with pytest.raises(ValueError, match="expects 64x64"):
        tiny()(x)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 70, 64))


def test_capture_attention_is_exact_and_leaves_the_model_fused():
    model = tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = model(x)
        with vitkit.capture_attention(model, layers=[-1]) as attn:
            unfused = model(x)
        after = model(x)
    assert torch.allclose(fused, unfused, atol=1e-5) and torch.equal(fused, after)
    assert list(attn) == [1] and attn[1].shape == (2, 3, 17, 17)
    assert torch.allclose(attn[1].sum(-1), torch.ones(2, 3, 17))
    assert all(m.attn.probs_sink is None for m in model.blocks)
    with pytest.raises(IndexError, match="2 blocks"):
        with vitkit.capture_attention(model, layers=[5]):
            pass


@pytest.mark.parametrize("distilled", [False, True])
def test_last_block_computes_only_the_class_token_with_the_same_logits_and_gradients(distilled):
    model = tiny(drop_path=0.2, distilled=distilled).train()  # stochastic depth: one mask per sample either way
    x = torch.randn(4, 3, 64, 64)
    outs, grads = [], []
    for forward in (model, lambda x: model.forward_head(model.forward_features(x))):
        torch.manual_seed(0)
        model.zero_grad()
        outs.append(forward(x))
        outs[-1].square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and outs[0].abs().max() > 0.1
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4) for k in grads[1])
    assert grads[0]["blocks.1.mlp.fc1.weight"].abs().max() > 0
    fewer = []  # the shortcut is taken: the last MLP sees one token per image
    model.blocks[-1].mlp.register_forward_hook(lambda m, i, o: fewer.append(o.shape[1]))
    model(x), model.forward_features(x)
    assert fewer == [1 + distilled, 17 + distilled]  # ([class] and distillation tokens)


def test_forward_intermediates_and_features():
    model = tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.forward_intermediates(x)
        tokens = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC")
        feats = model.forward_features(x)
    assert [m.shape for m in maps] == [(2, 192, 4, 4)] * 2
    for wrong in ([2], [-3], 3):
        with pytest.raises(IndexError, match="the model has 2 blocks"):
            model.forward_intermediates(x, indices=wrong)
    assert torch.allclose(tokens[0], feats)
    assert torch.allclose(maps[-1].flatten(2).transpose(1, 2), model.blocks[1](model.blocks[0](model.embed(x)[0]))[:, 1:],
                          atol=1e-6)


def test_heads_pooling_and_prelogits():
    gap = tiny(pool="gap", class_token=False)
    assert gap.cls_token is None and gap.pos_embed.shape[1] == 16
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = gap.forward_features(x)
        assert torch.allclose(gap(x), gap.head(tokens.mean(1)), atol=1e-6)
    pre = tiny(representation_size=32, num_classes=5)
    with torch.no_grad():
        feats = pre.forward_head(pre.forward_features(x), pre_logits=True)
    assert feats.shape == (2, 32) and feats.abs().max() <= 1  # tanh
    zero = tiny(zero_head=True, num_classes=7)
    assert zero.head.weight.abs().sum() == 0 and torch.equal(zero(x), torch.zeros(2, 7))
    assert "blocks.0.attn.qkv.bias" not in tiny(qkv_bias=False).state_dict()


def test_dropout_and_stochastic_depth_only_in_training():
    model = tiny(dropout=0.1, attn_dropout=0.1, drop_path=0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))
    assert [b.drop_path_rate for b in model.blocks] == [0.0, 0.2]


def test_hybrid_grid_and_features():
    model = vitkit.create_model("R50+ViT-B/16", depth=1, img_size=128).eval()
    assert model.cfg.grid == (8, 8) and model.patch_embed.proj.kernel_size == (1, 1)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 128)).shape == (1, 1000)
