"""The ViT itself: architecture against timm for every released name, options, resampling, attention capture."""
import re

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.models import registry, resample_pos_embed
from weight_peers import CLASSES, assert_close, images, randomize, save_timm, tv, vitkit_logits

timm = pytest.importorskip("timm")


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", [n for n in vitkit.list_models() if n.startswith(("vit_", "deit_"))
                                  and not n.startswith(("vit_b_", "vit_l_", "vit_h_"))])
def test_every_timm_name_has_timms_exact_parameters(name):
    """Built on the meta device: no memory, so even ViT-H/14 is cheap."""
    with torch.device("meta"):
        ours, theirs = vitkit.create_model(name), timm.create_model(name, num_classes=1000)
    assert {p.device.type for p in ours.parameters()} == {"meta"}  # the caller's device, not a pinned CPU
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
    with pytest.raises(ValueError, match=r"input of shape \(3, 64, 64\): a batch \(B, C, H, W\) is expected; add "):
        model(torch.randn(3, 64, 64))  # was: "Sizes of tensors must match" from the [class] token's concatenation


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
    assert all(not m.attn.probs_sinks for m in model.blocks)
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
    fewer, mlp = [], model.blocks[-1].mlp  # the shortcut is taken: the last MLP sees one token per image (a spy,
    original = mlp.forward  # not a hook: a hook there asks for every token, as test_model_api checks)
    mlp.forward = lambda t: fewer.append(t.shape[1]) or original(t)
    model(x), model.forward_features(x)
    assert fewer == [1 + distilled, 17 + distilled]  # ([class] and distillation tokens)


def flat(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for item in out for t in flat(item)]


@pytest.mark.parametrize("distilled", [False, True])
def test_forward_intermediates_is_timms(distilled):
    """The same call as timm's VisionTransformer.forward_intermediates, with the same results (weights copied)."""
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    model = vitkit.create_model(name, img_size=(64, 48), depth=3)
    peer = timm.create_model(name, img_size=(64, 48), depth=3, num_classes=1000).eval()
    peer.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 48)
    calls = [{}, dict(indices=2, norm=True), dict(indices=[0, -1], output_fmt="NLC", return_prefix_tokens=True),
             dict(indices=[1], stop_early=True), dict(indices=1, intermediates_only=True, output_fmt="NLC")]
    with torch.no_grad():
        for kw in calls:
            ours, theirs = model.forward_intermediates(x, **kw), peer.forward_intermediates(x, **kw)
            assert [t.shape for t in flat(ours)] == [t.shape for t in flat(theirs)], kw
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(flat(ours), flat(theirs))), kw
        feats = model.forward_features(x)
    assert torch.equal(model.forward_intermediates(x)[0], feats)
    for wrong in ([3], [-4], 4, []):
        with pytest.raises(IndexError, match="the model has 3 blocks|no blocks chosen"):
            model.forward_intermediates(x, indices=wrong)
    with pytest.raises(ValueError, match="output_fmt 'NHWC': use 'NCHW' or 'NLC'"):
        model.forward_intermediates(x, output_fmt="NHWC")


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


@pytest.mark.parametrize("name", [n for n in vitkit.list_models() if n.startswith("vit_")
                                  and not n.startswith(("vit_b_", "vit_l_", "vit_h_")) and n != "vit_small_patch8_224"])
def test_every_timm_name_has_timms_heads_and_preprocessing(name):
    cfg, pre = registry.resolve(name)
    with torch.device("meta"):
        theirs = timm.create_model(name)
    assert cfg["num_heads"] == theirs.blocks[0].attn.num_heads
    pc = theirs.pretrained_cfg
    assert (tuple(pre["mean"]), tuple(pre["std"]), pre["crop_pct"], pre["interpolation"]) == \
        (tuple(pc["mean"]), tuple(pc["std"]), pc["crop_pct"], pc["interpolation"])


@pytest.mark.parametrize("tv_name, weights", [
    ("vit_b_16", "IMAGENET1K_V1"), ("vit_b_32", "IMAGENET1K_V1"), ("vit_l_32", "IMAGENET1K_V1"),
    ("vit_l_16", "IMAGENET1K_V1"),  # resized to 242, not 256
    ("vit_h_14", "IMAGENET1K_SWAG_LINEAR_V1")])
def test_torchvision_names_have_torchvisions_heads_and_preprocessing(tv_name, weights):
    cfg, pre = registry.resolve(tv_name)
    with torch.device("meta"):
        theirs = getattr(tv, tv_name)()
    assert cfg["num_heads"] == theirs.encoder.layers[0].self_attention.num_heads
    from torchvision.models import get_model_weights

    t = get_model_weights(tv_name)[weights].transforms()  # ImageClassification: resize, crop, mean/std
    assert tuple(pre["mean"]) == tuple(t.mean) and tuple(pre["std"]) == tuple(t.std)
    assert pre["crop_pct"] == pytest.approx(t.crop_size[0] / t.resize_size[0])
    assert pre["interpolation"] == t.interpolation.value


@pytest.mark.parametrize("eps", [1e-12, 1e-6, 1e-3])
def test_every_layernorm_uses_the_configured_eps(eps):
    model = vitkit.create_model("ViT-Ti/16", img_size=64, depth=2, norm_eps=eps, pool="gap", fc_norm=True)
    model2 = vitkit.create_model("ViT-Ti/16", img_size=64, depth=2, norm_eps=eps)
    norms = [m for mod in (model, model2) for m in mod.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 * 2 + 2 and all(m.eps == eps for m in norms)


def test_mlp_is_exact_gelu_against_timm(tmp_path):
    peer = randomize(timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=CLASSES))
    with torch.no_grad():
        peer.blocks[0].mlp.fc1.weight.mul_(5)  # pre-activations of about one unit, where the two GELUs differ most
        peer.blocks[0].mlp.fc2.weight.mul_(20)  # and the MLP's share of the residual stream large
    path = tmp_path / "ti.safetensors"
    save_timm(peer, path)
    with torch.no_grad():
        ref = peer(images(224))
    assert_close(vitkit_logits("ViT-Ti/16", path, 224), ref)


def test_distilled_pre_logits_match_timm(tmp_path):
    peer = randomize(timm.create_model("deit_tiny_distilled_patch16_224", depth=1, num_classes=CLASSES))
    path = tmp_path / "deit.pth"
    save_timm(peer, path, container=True)
    model = vitkit.create_model("ViT-Ti/16", weights=path, depth=1)
    x = images(224)
    with torch.no_grad():
        ref = peer.forward_head(peer.forward_features(x), pre_logits=True)
        assert_close(model.forward_head(model.forward_features(x), pre_logits=True), ref)


def test_dynamic_img_size_distilled(tmp_path):
    torch.manual_seed(0)
    model = vitkit.create_model("ViT-Ti/16", img_size=64, depth=2, distilled=True, dynamic_img_size=True).eval()
    vitkit.save_model(model, tmp_path / "m.safetensors")
    other = vitkit.load_model(tmp_path / "m.safetensors", img_size=(96, 48))
    x = torch.randn(2, 3, 96, 48)
    with torch.no_grad():
        assert torch.allclose(model(x), other(x), atol=1e-5)


def test_registry_deit_crop_and_paper_hybrid_size():
    for size, crop in ((224, 0.875), (384, 1.0)):
        for name in (f"deit_base_patch16_{size}", f"deit_base_distilled_patch16_{size}"):
            cfg, pre = registry.resolve(name)
            assert pre == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": crop,
                           "interpolation": "bicubic"} and cfg["img_size"] == size
    cfg, pre = registry.resolve("R50+ViT-B/16")
    assert cfg["img_size"] == 384 and cfg["hybrid_layers"] == (3, 4, 9) and pre["crop_pct"] == 1.0


# --- review: configuration checks, edge rates, dtypes, names ---------------------------------------------------
@pytest.mark.parametrize("option, message", [
    (dict(drop_path=1.5), "drop_path must be a number in [0, 1], not 1.5"),
    (dict(attn_dropout=-0.1), "attn_dropout must be a number in [0, 1], not -0.1"),
    (dict(dropout="0.1"), "dropout must be a number in [0, 1], not '0.1'"),
    (dict(norm_eps=-1), "norm_eps must be a positive number, not -1"),
    (dict(in_chans=0), "in_chans must be positive, not 0"),
    (dict(conv_stem=(32, -1)), "conv_stem must be positive ints, not (32, -1)"),
    (dict(hybrid_layers=(0, 1)), "hybrid_layers must be positive ints, not (0, 1)"),
    (dict(hybrid_layers=(1, 1), hybrid_width=16), "hybrid_width must be a multiple of 32"),
])
def test_bad_options_are_refused_when_the_config_is_made(option, message):
    """Each was accepted and failed later: at the first training step, at forward, or as NaN logits."""
    with pytest.raises(ValueError, match=re.escape(message)):
        vitkit.ViTConfig(patch_size=8, img_size=32, width=64, depth=2, num_heads=4, mlp_dim=128, **option)


def test_drop_path_one_drops_every_branch_as_timm_does():
    model = vitkit.create_model("vit_tiny_patch16_224", img_size=32, depth=2, drop_path=1.0).train()
    peer = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, drop_path_rate=1.0).train()
    peer.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    ours, theirs = model.forward_features(x), peer.forward_features(x)
    assert torch.isfinite(ours).all() and torch.allclose(ours, theirs, atol=1e-5)  # blocks skipped: embeddings alone


def test_distilled_heads_get_dropout_and_a_new_head_takes_the_models_dtype():
    model = vitkit.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1, dropout=0.5).train()
    feats = model.forward_features(torch.randn(2, 3, 32, 32)).detach()
    torch.manual_seed(0)
    first = model.forward_head(feats)
    assert not torch.equal(first, model.forward_head(feats))  # as timm's VisionTransformerDistilled (head_drop)
    model = model.eval().to(torch.bfloat16)
    model.reset_head(5)
    assert model.head.weight.dtype == model.head_dist.weight.dtype == torch.bfloat16
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)).shape == (2, 5)


def test_paper_names_of_the_hybrid_and_spaced_names():
    assert registry.resolve("R50+ViT-B/16@224")[0] == registry.resolve("vit_base_r50_s16_224")[0]
    assert registry.resolve("R50+ViT-B/16@384") == registry.resolve("vit_base_r50_s16_384")
    assert registry.resolve("ViT-B/16 @384") == registry.resolve("ViT-B/16@384")
    pre = registry.resolve("vit_small_patch8_224")[1]  # timm's DINO weights: ImageNet statistics
    cfg = timm.create_model("vit_small_patch8_224", pretrained=False).pretrained_cfg
    assert (pre["mean"], pre["std"], pre["crop_pct"]) == (cfg["mean"], cfg["std"], cfg["crop_pct"])
