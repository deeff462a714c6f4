"""The model as code written for timm and torchvision uses it: hooks, FX feature extraction, torch.export with a
dynamic image size, timm's data config and classifier methods, gradient checkpointing, state dicts in memory, and
bad inputs said in the model's own terms."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitkit
from weight_peers import assert_close, hf_vit, images, randomize, tv_vit

timm = pytest.importorskip("timm")


def tiny(**kw) -> vitkit.ViT:
    return randomize(vitkit.create_model("ViT-Ti/16", img_size=64, depth=2, num_classes=5, **kw))


@pytest.mark.parametrize("peer", ["torchvision", "transformers"])
def test_dynamic_img_size_resamples_as_the_checkpoints_codebase(tmp_path, peer):
    """Per call, the position embeddings are resampled the way the weights' codebase does it (torchvision: corners
    aligned; transformers: no antialiasing), as img_size=... at load does: the same logits either way."""
    state = (randomize(tv_vit("ViT-Ti/16")) if peer == "torchvision" else hf_vit("ViT-Ti/16")).state_dict()
    fixed = vitkit.create_model("ViT-Ti/16", weights=state, img_size=(96, 128), depth=1)
    dynamic = vitkit.create_model("ViT-Ti/16", weights=state, dynamic_img_size=True, depth=1)
    assert dynamic.pos_resample == fixed.pos_resample != {}
    x = images((96, 128))
    with torch.no_grad():
        assert_close(dynamic(x), fixed(x))
    if peer == "transformers":  # and as transformers computes it at that size itself
        peer_model = hf_vit("ViT-Ti/16")
        with torch.no_grad():
            ref = peer_model(pixel_values=x, interpolate_pos_encoding=True).logits
            assert_close(dynamic(x), ref)


def test_hooks_and_fx_feature_extraction_see_every_token():
    """The last block computes the [class] token alone for speed, unless someone looks at it: a forward hook
    (Grad-CAM) or FX tracing (torchvision's create_feature_extractor) gets all tokens, as in timm."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model, x = tiny(), images(64)
    with torch.no_grad():
        logits, features = model(x), model.forward_features(x)
        seen = []
        hook = model.blocks[-1].register_forward_hook(lambda m, i, out: seen.append(out))
        assert torch.allclose(model(x), logits, atol=1e-6)
        hook.remove()
        assert seen[0].shape == (2, 17, 192)
        extractor = create_feature_extractor(model, ["blocks.1", "norm", "head"])
        out = extractor(x)
    assert out["blocks.1"].shape == (2, 17, 192) and torch.equal(seen[0], out["blocks.1"])
    assert torch.allclose(out["norm"], features, atol=1e-6) and torch.allclose(out["head"], logits, atol=1e-6)


def test_export_with_a_dynamic_image_size():
    model = tiny(dynamic_img_size=True)
    h, w = torch.export.Dim("h", min=2, max=8), torch.export.Dim("w", min=2, max=8)
    exported = torch.export.export(model, (images(64),), dynamic_shapes={"x": {2: 16 * h, 3: 16 * w}}).module()
    for size in [(64, 64), (96, 32)]:  # the traced size and another, each as the eager model gives it
        with torch.no_grad():
            assert torch.allclose(exported(images(size)), model(images(size)), atol=1e-5)


def test_timm_data_config_and_classifier_methods():
    from timm.data import create_transform, resolve_data_config

    model = vitkit.create_model("deit_tiny_patch16_224", num_classes=3)
    config = resolve_data_config({}, model=model)  # was ImageNet's mean and crop 0.875 whatever the model
    assert config["mean"] == model.preprocess["mean"] and config["crop_pct"] == model.preprocess["crop_pct"]
    other = vitkit.create_model("ViT-Ti/16", img_size=(96, 128), num_classes=3)
    config = resolve_data_config({}, model=other)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["input_size"] == (3, 96, 128)
    assert create_transform(**config) is not None
    assert other.get_classifier() is other.head and other.embed_dim == 192
    other.reset_classifier(7)
    assert other.head.out_features == 7 and not other.head.weight.any()
    assert other.no_weight_decay() == set(timm.create_model("deit_tiny_distilled_patch16_224").no_weight_decay()) - {
        "reg_token"}


def test_grad_checkpointing_gives_the_same_gradients():
    x = images(64)
    grads = []
    for enable in (False, True):
        model = tiny(drop_path=0.5, dropout=0.1).train()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(0)  # the recomputation replays the same dropout masks
        F.cross_entropy(model(x), torch.tensor([1, 3])).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    assert grads[0]["blocks.0.attn.qkv.weight"].abs().max() > 0


def test_a_state_dict_in_memory_loads_like_its_file():
    peer = randomize(timm.create_model("vit_tiny_patch16_224", num_classes=4, depth=1))
    model = vitkit.create_model("ViT-Ti/16", weights=peer.state_dict(), depth=1)
    with torch.no_grad():
        assert_close(model(images(224)), peer(images(224)))
    with pytest.raises(TypeError, match="weights: a file, a transformers directory, a URL, 'hf-hub:ORG/REPO' or a "
                                        "state dict, not bool True"):  # timm's pretrained=True habit
        vitkit.create_model("ViT-Ti/16", weights=True)


@pytest.mark.parametrize("kw, message", [
    (dict(reg_tokens=4), "reg_token: a model with 4 register tokens"),
    (dict(no_embed_class=True), "pos_embed: 196 positions for the patches alone, none for the \\[class\\] token"),
])
def test_timm_features_vitkit_lacks_are_named(kw, message):
    """These failed as 'cannot tell the grid ...; give the checkpoint's own img_size', which did not help."""
    peer = timm.create_model("vit_tiny_patch16_224", num_classes=4, depth=1, **kw)
    with pytest.raises(vitkit.weights.CheckpointError, match=message):
        vitkit.create_model("ViT-Ti/16", weights=peer.state_dict(), depth=1)


@pytest.mark.parametrize("x, error, message", [
    (np.zeros((1, 3, 64, 64), np.float32), TypeError, r"not ndarray; torch.from_numpy\(x\) makes one"),
    (torch.zeros(1, 64, 64, 3), ValueError, r"takes 3 channels, \(B, 3, H, W\); this looks like \(B, H, W, C\): "
                                            r"x.permute\(0, 3, 1, 2\)"),
    (torch.zeros(1, 1, 64, 64), ValueError, r"input of shape \(1, 1, 64, 64\): the model takes 3 channels"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "dtype torch.uint8: the model takes float pixels "
                                                               "normalised as model.preprocess says"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.float64), TypeError, "dtype torch.float64, the model's weights "
                                                                 "torch.float32"),
])
def test_bad_inputs_are_said_in_the_models_terms(x, error, message):
    with pytest.raises(error, match=message):
        tiny()(x)


def test_autocast_and_empty_batches_still_run():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(images(64)).dtype == torch.bfloat16
    assert model.to(torch.bfloat16)(images(64).bfloat16()).shape == (2, 5)
    empty = model.float().forward_intermediates(torch.zeros(0, 3, 64, 64), indices=1, intermediates_only=True)
    assert empty[0].shape == (0, 192, 4, 4)  # was: "cannot reshape tensor of 0 elements"


def test_names_with_spaces_and_timm_pretrained_tags():
    assert vitkit.models.registry.resolve("ViT Ti/16") == vitkit.models.registry.resolve("ViT-Ti/16")
    with pytest.raises(ValueError, match=r"'.augreg_in21k' names timm's pretrained weights; give the architecture "
                                         r"and the weights: create_model\('vit_small_patch16_224', "
                                         r"weights='hf-hub:timm/vit_small_patch16_224.augreg_in21k'\)"):
        vitkit.create_model("timm/vit_small_patch16_224.augreg_in21k")


def test_resample_arguments_are_checked():
    from vitkit.models import resample_pos_embed

    pos = torch.randn(1, 1 + 16, 8)
    assert torch.equal(resample_pos_embed(pos, 6), resample_pos_embed(pos, (6, 6)))  # an int is a square grid
    with pytest.raises(ValueError, match=r"position embeddings of shape \(17, 8\): \(1, prefix \+ h\*w, D\)"):
        resample_pos_embed(pos[0], (6, 6))  # was: "cannot infer the grid of 7 position embeddings"
    with pytest.raises(ValueError, match="pos_resample 'bilinear': it says how weights being loaded are resampled"):
        vitkit.create_model("ViT-Ti/16", pos_resample="bilinear")  # was silently ignored


def test_a_folder_in_the_way_of_a_checkpoint_is_an_os_error(tmp_path):
    """The trainer says an OSError while saving in one line ("cannot write the checkpoint ..."); a folder made where
    last.safetensors goes was a ValueError, and a traceback on rank 0."""
    (tmp_path / "last.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="last.safetensors is a directory, not a .safetensors file"):
        vitkit.save_model(tiny(), tmp_path / "last.safetensors")


def test_python_dash_m_vitkit_cli_runs_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "vitkit.cli", "models", "--filter", "ViT-Ti/16"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "ViT-Ti/16" in done.stdout, done.stderr  # was: nothing at all, exit code 0
