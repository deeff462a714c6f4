"""vitkit.inspect: attention maps and the paper's Figure 7, checked against direct computations."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitkit
from vitkit.cli import main as vitkit_main
from vitkit.inspect import all_attentions, attention_map, rollout
from vitkit.inspect import figure7
from vitkit.inspect.attention import token_map
from vitkit.models.vit import Attention

from image_utils import photo


def tiny_vit(**overrides):
    torch.manual_seed(0)
    cfg = dict(patch_size=8, img_size=32, width=32, depth=3, num_heads=2, mlp_dim=64, num_classes=5)
    return vitkit.ViT(vitkit.ViTConfig(**{**cfg, **overrides})).eval()


# --- a model whose attention is set by hand ---------------------------------------------------------
GRID, HEADS = (4, 4), 2


def handset_vit(scales, pool="token", width=8, orthogonal=False, class_token=True):
    """Tokens are the position embeddings alone, every block is the identity on the residual stream, and
    head h of layer l has logits scales[l][h] * <z_i, z_j> / sqrt(head_dim) with z = LayerNorm(position).
    So its attention probabilities follow from the position embeddings in closed form. orthogonal: each
    head's slices of the embeddings are orthonormal and zero-mean, so a large scale means attending to itself."""
    torch.manual_seed(1)
    model = vitkit.ViT(vitkit.ViTConfig(patch_size=4, img_size=16, width=width, depth=len(scales), num_heads=HEADS,
                                        mlp_dim=16, num_classes=3, pool=pool, class_token=class_token))
    dh = width // HEADS
    with torch.no_grad():
        model.pos_embed.normal_()
        if orthogonal:
            basis = torch.randn(dh, model.pos_embed.shape[1])
            q, _ = torch.linalg.qr(basis - basis.mean(dim=0))  # orthonormal columns, orthogonal to all-ones
            model.pos_embed.copy_(q.T.repeat(1, HEADS)[None])
        torch.nn.init.zeros_(model.patch_embed.proj.weight), torch.nn.init.zeros_(model.patch_embed.proj.bias)
        if model.cls_token is not None:
            model.cls_token.zero_()
        for blk, layer_scales in zip(model.blocks, scales):
            qkv = torch.zeros(3 * width, width)
            qkv[:width] = torch.diag(torch.tensor(layer_scales, dtype=torch.float32).repeat_interleave(dh))
            qkv[width:2 * width] = torch.eye(width)
            qkv[2 * width:] = torch.randn(width, width)
            blk.attn.qkv.weight.copy_(qkv), blk.attn.qkv.bias.zero_()
            for lin in (blk.attn.proj, blk.mlp.fc2):  # residual branches add nothing
                lin.weight.zero_(), lin.bias.zero_()
    return model.eval()


def direct_attention(model, scales) -> np.ndarray:
    """(layers, heads, N, N) straight from the construction, in float64 numpy."""
    pos = model.pos_embed[0].detach().double().numpy()
    z = (pos - pos.mean(-1, keepdims=True)) / np.sqrt(pos.var(-1, keepdims=True) + model.cfg.norm_eps)
    dh = model.cfg.width // HEADS
    out = []
    for layer_scales in scales:
        heads = []
        for h, a in enumerate(layer_scales):
            zh = z[:, h * dh:(h + 1) * dh]
            logits = a * zh @ zh.T / math.sqrt(dh)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            heads.append(p / p.sum(-1, keepdims=True))
        out.append(heads)
    return np.array(out)


def direct_rollout(attn: np.ndarray) -> np.ndarray:
    joint = np.eye(attn.shape[-1])
    for layer in attn:
        a = layer.mean(0) + np.eye(attn.shape[-1])
        joint = (a / a.sum(-1, keepdims=True)) @ joint
    return joint


SCALES = [[0.5, 3.0], [2.0, 0.0], [1.0, 5.0]]
PIXELS = torch.zeros(1, 3, 16, 16)  # the content does not matter: the patch embedding is zero


def test_handset_attention_is_returned_exactly():
    model = handset_vit(SCALES)
    got = all_attentions(model, PIXELS).double().numpy()
    want = direct_attention(model, SCALES)
    assert got.shape == (3, HEADS, 17, 17)
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert np.abs(want[0, 0] - want[0, 1]).max() > 0.05  # the heads really differ


@pytest.mark.parametrize("pool, class_token", [("token", True), ("gap", False), ("gap", True)])
def test_rollout_and_single_layer_maps_match_direct_computation(pool, class_token):
    model = handset_vit(SCALES, pool, class_token=class_token)
    want_attn = direct_attention(model, SCALES)
    prefix = int(class_token)

    def row(matrix):  # [class] row, or the mean over patch rows for gap (the [class] row, if any, left out)
        return (matrix[0] if pool == "token" else matrix[prefix:].mean(0))[prefix:]

    def norm(v):
        v = v.reshape(GRID)
        return v / v.max()

    cases = {("rollout", None, None): norm(row(direct_rollout(want_attn))),
             ("last-layer", None, None): norm(row(want_attn[-1].mean(0))),
             ("head", 0, 1): norm(row(want_attn[0, 1])),
             ("head", -2, None): norm(row(want_attn[1].mean(0)))}
    for (method, layer, head), want in cases.items():
        _, grid = token_map(model, PIXELS, method, layer, head)
        np.testing.assert_allclose(grid.double().numpy(), want, atol=1e-5, err_msg=method)
        full = attention_map(model, PIXELS, method, layer, head)  # a preprocessed tensor keeps its own size
        ref = F.interpolate(torch.from_numpy(want)[None, None], size=(16, 16), mode="bilinear")[0, 0].numpy()
        np.testing.assert_allclose(full, ref / ref.max(), atol=1e-5)


def test_rollout_of_uniform_attention_has_closed_form():
    n, layers = 10, 4  # uniform U is idempotent: ((U + I) / 2)^L = 2^-L I + (1 - 2^-L) U
    uniform = torch.full((layers, 3, n, n), 1 / n, dtype=torch.float64)
    want = 0.5**layers * torch.eye(n, dtype=torch.float64) + (1 - 0.5**layers) / n
    torch.testing.assert_close(rollout(uniform), want)


def test_map_has_the_original_image_resolution():
    model = tiny_vit()
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    for method in ("rollout", "last-layer", "head"):
        amap = attention_map(model, photo, method)
        assert isinstance(amap, np.ndarray) and amap.shape == (37, 53)
        assert amap.max() == pytest.approx(1.0) and amap.min() >= 0
    gap = tiny_vit(pool="gap", class_token=False)
    assert attention_map(gap, photo).shape == (37, 53)


# --- returned probabilities, and the model left as it was ---------------------------------------------
def test_rows_sum_to_one_and_equal_the_unfused_computation():
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    got = all_attentions(model, x)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), atol=1e-5, rtol=0)
    with torch.no_grad():
        tokens, _ = model.embed(x)
        for i, blk in enumerate(model.blocks):
            h = blk.norm1(tokens)
            q, k, _ = blk.attn.qkv(h).view(1, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
            want = (q @ k.transpose(-2, -1) / math.sqrt(16)).softmax(-1)[0]
            torch.testing.assert_close(got[i], want, atol=1e-6, rtol=1e-5)
            tokens = blk(tokens)


def test_inference_stays_fused_and_unchanged(monkeypatch):
    model = tiny_vit(dropout=0.1)
    model.train()  # a caller's training mode must survive
    x = torch.randn(2, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    before = model(x)
    model.train()
    for method in ("rollout", "last-layer", "head"):
        attention_map(model, x[:1], method)
    all_attentions(model, x[:1])
    assert model.training
    assert all(not m.probs_sinks for m in model.modules() if isinstance(m, Attention))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    fused = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: fused.append(1) or original(*a, **kw))
    model.eval()
    assert torch.equal(model(x), before)
    assert len(fused) == 3  # every block took the fused path
    with pytest.raises(RuntimeError), vitkit.capture_attention(model, [1]):
        raise RuntimeError("interrupted inside the block")
    assert all(not m.probs_sinks for m in model.modules() if isinstance(m, Attention))


def test_bad_arguments_give_clear_errors():
    model, x = tiny_vit(), torch.zeros(1, 3, 32, 32)
    with pytest.raises(IndexError, match="layer 3 is out of range: the model has 3 layers"):
        attention_map(model, x, "head", layer=3)
    with pytest.raises(IndexError, match="head -3 is out of range: the model has 2 heads"):
        attention_map(model, x, "head", head=-3)
    with pytest.raises(ValueError, match="method 'head'"):
        attention_map(model, x, "rollout", layer=0)
    with pytest.raises(ValueError, match="unknown method"):
        attention_map(model, x, "gradcam")
    with pytest.raises(TypeError, match="not a vitkit ViT"):
        attention_map(torch.nn.Conv2d(3, 3, 1), x)


# --- Figure 7 maths ------------------------------------------------------------------------------------
def brute_force_mean_distance(grid, pixels):
    cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    return np.mean([math.dist(a, b) for a in cells for b in cells]) * pixels


def test_attention_distance_local_versus_uniform():
    uniform = handset_vit([[0.0, 0.0]] * 2)  # zero query weights: every token attends evenly to all
    local = handset_vit([[5.0, 5.0]] * 2, width=2 * 18, orthogonal=True)  # attention stays on the patch itself
    mean_pairwise = brute_force_mean_distance(GRID, 4)
    dist, count = figure7.attention_distances(uniform, [PIXELS, PIXELS])
    assert count == 2 and dist.shape == (2, HEADS)
    np.testing.assert_allclose(dist, mean_pairwise, rtol=1e-6)
    near, _ = figure7.attention_distances(local, [PIXELS])
    assert near.max() < 0.01 * 4  # well under one patch (4 px)
    np.testing.assert_allclose(near, direct_distances(local, [[5.0, 5.0]] * 2), rtol=1e-4)
    # the same on hand-made probabilities: identity -> 0, one step right for every query -> one patch
    eye = torch.eye(17)[None, None]
    assert figure7.mean_attention_distance(eye, GRID, 1, 4).item() == pytest.approx(0)
    shift = torch.zeros(1, 1, 17, 17)
    for i in range(16):
        r, c = divmod(i, 4)
        shift[0, 0, 1 + i, 1 + r * 4 + (c + 1 if c < 3 else c - 1)] = 1
    assert figure7.mean_attention_distance(shift, GRID, 1, 4).item() == pytest.approx(4)


@pytest.mark.parametrize("img_size", [(32, 32), (32, 48)])
def test_position_similarity_diagonal_and_grid(img_size, tmp_path):
    model = tiny_vit(img_size=img_size)
    sim = figure7.position_similarity(model)
    h, w = model.cfg.grid
    assert sim.shape == (h * w, h * w)
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-6)
    np.testing.assert_allclose(sim, sim.T, atol=1e-6)
    with torch.no_grad():  # an all-zero embedding (an untrained zero init) is still itself
        model.pos_embed[0, model.num_prefix_tokens + 1] = 0
    zeroed = figure7.position_similarity(model)
    assert zeroed[1, 1] == 1 and zeroed[1, 0] == 0 and zeroed[0, 0] == pytest.approx(1)
    mosaic = figure7.similarity_mosaic(sim, (h, w))
    assert mosaic.shape == (h * (h + 1) - 1, w * (w + 1) - 1)
    i = h * w - 2  # last row, one before the last column: its own tile holds its similarities
    r, c = divmod(i, w)
    np.testing.assert_array_equal(mosaic[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w],
                                  sim[i].reshape(h, w))
    out = figure7.position_figure(model, tmp_path / "pos.png")
    assert out["grid"] == [h, w] and out["diagonal"] == pytest.approx([1, 1], abs=1e-6)
    width, height = assert_picture(tmp_path / "pos.png", (400, 300))
    assert (height < width) == (h < w)  # the picture follows the grid's shape


def test_filters_are_principal_components(tmp_path):
    model = tiny_vit()
    w = model.patch_embed.proj.weight.detach().double().flatten(1).numpy()
    comps, explained = figure7.filter_components(model.patch_embed.proj.weight, k=5)  # the Parameter itself
    centred = w - w.mean(0)
    eigval, eigvec = np.linalg.eigh(centred.T @ centred)  # covariance eigenvectors, ascending
    for j in range(5):
        assert abs(comps[j].ravel() @ eigvec[:, -1 - j]) == pytest.approx(1, abs=1e-6)
    np.testing.assert_allclose(explained, eigval[::-1][:5] / eigval.sum(), rtol=1e-6)
    summary = figure7.filters_figure(model, tmp_path / "f.png")
    assert summary["source"] == "patch_embed.proj" and len(summary["components"]) == 28
    assert_picture(tmp_path / "f.png", (500, 300))


def test_hybrid_shows_stem_filters(tmp_path):
    model = tiny_vit(patch_size=1, hybrid_layers=(1,), img_size=32)
    summary = figure7.filters_figure(model, tmp_path / "f.png")
    assert summary["source"].startswith("patch_embed.backbone.stem.conv") and summary["filter_shape"] == [64, 3, 7, 7]
    assert_picture(tmp_path / "f.png", (500, 300))
    w = model.patch_embed.backbone.stem.conv.weight.detach().flatten(1)  # shown as applied: standardised
    standardised = (w - w.mean(1, keepdim=True)) / w.std(1, unbiased=False, keepdim=True)
    comps, _ = figure7.filter_components(standardised.reshape(64, 3, 7, 7), k=28)
    np.testing.assert_allclose(np.abs(summary["components"]), np.abs(comps.round(4)), atol=2e-4)
    dist, _ = figure7.attention_distances(model, [torch.randn(1, 3, 32, 32)])
    assert dist.shape == (3, 2) and (dist > 0).all() and (dist < 32 * math.sqrt(2)).all()


@pytest.mark.skipif(not hasattr(vitkit.ViTConfig, "conv_stem"), reason="no conv stem in this vitkit")
def test_conv_stem_shows_first_conv(tmp_path):
    model = tiny_vit(conv_stem=(8, 16), patch_size=4)
    summary = figure7.filters_figure(model, tmp_path / "f.png")
    assert summary["source"].startswith("patch_embed.backbone.0.conv") and summary["filter_shape"] == [8, 3, 3, 3]


def test_default_images(monkeypatch):
    paths, source = figure7.default_images()
    if figure7.SAMPLES[-1].is_dir():
        assert len(paths) >= 40 and source in map(str, figure7.SAMPLES)
    monkeypatch.setattr(figure7, "SAMPLES", [figure7.SAMPLES[-1] / "nowhere"])
    images, source = figure7.default_images()
    assert "generated" in source and len(images) == 16
    arrays = [np.asarray(im) for im in images[:3]]
    assert all(a.shape == (224, 224, 3) and a.std() > 20 for a in arrays)
    assert not np.array_equal(arrays[0], arrays[1])


def direct_distances(model, scales):
    attn = direct_attention(model, scales)[..., 1:, 1:]
    attn = attn / attn.sum(-1, keepdims=True)
    cells = [(r, c) for r in range(GRID[0]) for c in range(GRID[1])]
    dist = np.array([[math.dist(a, b) * 4 for b in cells] for a in cells])
    return (attn * dist).sum(-1).mean(-1)


# --- a model trained in vitkit --------------------------------------------------------------------------
def assert_picture(path, min_size):
    """The PNG opens, is at least min_size (w, h), and is not blank: many colours, real contrast."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        size = img.size
        pixels = np.asarray(img.convert("RGB"))
    assert size[0] >= min_size[0] and size[1] >= min_size[1], size
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    return size


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A small ViT trained on scikit-learn's digits (16x16, 2x2 patches -> 8x8 grid) with a plain loop, a
    few seconds; saved as a vitkit checkpoint, with a few digits written as PNG files."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = F.interpolate(torch.tensor(data.images, dtype=torch.float32)[:, None] / 8 - 1, size=16, mode="bilinear")
    x, y = x.expand(-1, 3, -1, -1), torch.tensor(data.target)
    torch.manual_seed(0)
    model = vitkit.ViT(vitkit.ViTConfig(patch_size=2, img_size=16, width=16, depth=2, num_heads=2, mlp_dim=32,
                                        num_classes=10))
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest
    try:
        for _ in range(600):
            idx = torch.randint(0, len(x), (32,))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(), loss.backward(), opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    model.class_names = [str(i) for i in range(10)]
    d = tmp_path_factory.mktemp("digits")
    ckpt = vitkit.save_model(model, d / "digits.safetensors")
    images = []
    for i in range(3):
        images.append(d / f"digit{i}.png")
        Image.fromarray((data.images[i] * 255 / 16).astype(np.uint8)).convert("RGB").save(images[-1])
    return model, untrained, accuracy, ckpt, images


def neighbour_contrast(model):
    """Mean position similarity of 4-neighbours minus that of positions at least half the grid apart."""
    sim = figure7.position_similarity(model)
    dist = figure7.grid_distances(model.cfg.grid)
    return sim[dist == 1].mean() - sim[dist >= model.cfg.grid[0] / 2].mean()


def test_trained_model_position_embeddings_have_2d_structure(digits):
    model, untrained, accuracy, _, _ = digits
    assert accuracy > 0.8
    assert neighbour_contrast(model) > 0.15
    fresh = vitkit.ViT(model.cfg)
    fresh.load_state_dict(untrained)
    assert abs(neighbour_contrast(fresh)) < 0.1  # random initial embeddings have no such structure


def test_inspect_command_writes_figure7(digits, tmp_path, capsys):
    model, _, _, ckpt, images = digits
    out = tmp_path / "fig7"
    assert vitkit_main(["inspect", "--weights", str(ckpt), "-o", str(out), "--images", *map(str, images)]) == 0
    sizes = {"filters.png": (500, 300), "position_similarity.png": (500, 500), "attention_distance.png": (500, 400)}
    for name, size in sizes.items():
        assert_picture(out / name, size)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["grid"] == [8, 8]
    pos = summary["position_similarity"]
    sim = figure7.position_similarity(model)
    np.testing.assert_allclose(pos["matrix"], sim, atol=1e-4)
    assert pos["neighbours_mean"] - pos["mean_by_distance"]["5.000"] > 0.15
    dist = summary["attention_distance"]
    assert dist["images"] == 3 and np.array(dist["per_layer_head"]).shape == (2, 2)
    want, _ = figure7.attention_distances(model, images)
    np.testing.assert_allclose(dist["per_layer_head"], want, atol=1e-4)
    assert dist["uniform_attention"] == pytest.approx(brute_force_mean_distance((8, 8), 2))
    # existing files are kept unless --force
    before = (out / "summary.json").read_bytes()
    capsys.readouterr()
    assert vitkit_main(["inspect", "--weights", str(ckpt), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and (out / "summary.json").read_bytes() == before
    # from Python, the folder may be given as a string, as every other path in the API
    summary = figure7.write_figure7(model, str(tmp_path / "py"), images)
    assert sorted(p.name for p in (tmp_path / "py").iterdir()) == sorted([*sizes, "summary.json"])
    np.testing.assert_allclose(summary["attention_distance"]["per_layer_head"], want, atol=1e-4)


def test_attention_command(digits, tmp_path, capsys):
    model, _, _, ckpt, images = digits
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    out = tmp_path / "maps"
    code = vitkit_main(["attention", str(images[0]), str(bad), str(images[1]), "--weights", str(ckpt), "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert [line for line in captured.err.splitlines() if "bad.jpg" in line] == \
        [f"vitkit attention: error: {bad}: not an image (unrecognised format)"]
    written = sorted(p.name for p in out.iterdir())
    assert written == ["digit0_rollout.png", "digit1_rollout.png"]
    top, = next(vitkit.classify(model, [images[0]], top_k=1))["top_k"]  # as `vitkit predict` says
    assert f"predicted: {top['label']} ({top['prob']:.1%})" in captured.out
    for name in written:
        assert_picture(out / name, (1000, 300))
    # one image to one file; existing files are kept unless --force
    single = tmp_path / "one.png"
    args = ["attention", str(images[2]), "--weights", str(ckpt), "-o", str(single), "--method", "head", "--layer", "0",
            "--head", "1"]
    assert vitkit_main(args) == 0
    before = single.read_bytes()
    assert vitkit_main(args[:4] + ["-o", str(single)]) == 1 and single.read_bytes() == before
    assert vitkit_main(args[:4] + ["-o", str(single), "--force"]) == 0 and single.read_bytes() != before


@pytest.mark.parametrize("extra, message", [
    (["--method", "head", "--layer", "7"], "--layer 7 is out of range: the model has 2 layers"),
    (["--method", "head", "--head", "2"], "--head 2 is out of range: the model has 2 heads"),
    (["--layer", "0"], "use them with --method head"),
])
def test_attention_command_rejects_impossible_indices(digits, tmp_path, capsys, extra, message):
    _, _, _, ckpt, images = digits
    out = tmp_path / "x.png"
    assert vitkit_main(["attention", str(images[0]), "--weights", str(ckpt), "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_commands_reject_a_checkpoint_without_attention(digits, tmp_path, capsys):
    _, _, _, _, images = digits
    not_vit = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, not_vit)
    for command in (["attention", str(images[0]), "-o", str(tmp_path / "a.png")], ["inspect", "-o", str(tmp_path)]):
        assert vitkit_main([*command, "--model", "ViT-Ti/16", "--weights", str(not_vit)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not a ViT checkpoint" in err
    assert vitkit_main(["attention", str(images[0]), str(images[1]), "--weights", str(not_vit),
                        "-o", str(tmp_path / "a.png")]) == 2
    assert "need an output folder" in capsys.readouterr().err


def test_attention_output_must_be_png_or_folder_and_empty_folders_are_reported(digits, tmp_path, capsys):
    _, _, _, ckpt, images = digits
    jpg = tmp_path / "map.jpg"  # once made a folder called map.jpg
    assert vitkit_main(["attention", str(images[0]), "--weights", str(ckpt), "-o", str(jpg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"-o {jpg}: maps are written as PNG" in err and not jpg.exists()
    (tmp_path / "empty").mkdir()
    out = tmp_path / "maps"
    args = ["attention", str(images[0]), str(tmp_path / "empty"), "--weights", str(ckpt), "-o", str(out)]
    assert vitkit_main(args) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert errors == [f"vitkit attention: error: {tmp_path / 'empty'}: no images found in this folder"]
    assert [p.name for p in out.iterdir()] == ["digit0_rollout.png"]


@pytest.mark.parametrize("shape", [(2000, 3), (3, 2000)])
def test_attention_picture_of_a_thin_image_has_a_bounded_size(digits, tmp_path, shape):
    _, _, _, ckpt, _ = digits
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)).save(tmp_path / "thin.png")
    out = tmp_path / "map.png"
    assert vitkit_main(["attention", str(tmp_path / "thin.png"), "--weights", str(ckpt), "-o", str(out)]) == 0
    width, height = assert_picture(out, (1000, 150))  # opens (the tall one was 1440x320084: a decompression bomb)
    assert height <= 2100


def test_attention_picture_panels_are_one_size(tmp_path, monkeypatch):
    """The map's colour bar took its width from the middle panel, which came out smaller than the other two."""
    from vitkit.inspect import cli as inspect_cli

    drawn = []
    monkeypatch.setattr(inspect_cli, "save_figure", lambda fig, path: drawn.append(fig))
    inspect_cli.attention_figure(np.zeros((60, 90, 3), np.uint8), np.random.default_rng(0).random((60, 90)), "t",
                                 tmp_path / "a.png")
    drawn[0].canvas.draw()
    boxes = [ax.get_window_extent() for ax in drawn[0].axes[:3]]
    assert all(abs(b.width - boxes[0].width) < 1 and abs(b.height - boxes[0].height) < 1 for b in boxes), boxes
    assert len(drawn[0].axes[1].child_axes) == 1  # the colour bar, beside the map


def test_failed_inspect_writes_nothing(digits, tmp_path, capsys):
    _, _, _, ckpt, images = digits
    bad, out = tmp_path / "bad.jpg", tmp_path / "fig7"
    bad.write_text("not an image")
    assert vitkit_main(["inspect", "--weights", str(ckpt), "-o", str(out), "--images", str(bad)]) == 2
    assert "no readable images" in capsys.readouterr().err and not out.exists()
    assert vitkit_main(["inspect", "--weights", str(tmp_path / "missing.safetensors"), "-o", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err and not out.exists()
    # so the next run needs no --force; an empty folder among the images is one line, the others are measured
    (tmp_path / "empty").mkdir()
    args = ["inspect", "--weights", str(ckpt), "-o", str(out), "--images", str(tmp_path / "empty"), *map(str, images)]
    assert vitkit_main(args) == 1
    assert f"vitkit inspect: error: {tmp_path / 'empty'}: no images found in this folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(figure7.FIGURES)
    assert json.loads((out / "summary.json").read_text())["attention_distance"]["images"] == 3


# --- non-square grids, summary numbers and command details ----------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 5-class vitkit checkpoint with its own class names, depth 3, 2 heads."""
    model = tiny_vit()
    model.class_names = [f"class-{i}" for i in range(5)]
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    vitkit.save_model(model, path)
    return path, model


def test_map_of_a_non_square_model_is_row_major_on_its_grid():
    from vitkit.inspect import all_attentions, rollout
    from vitkit.inspect.attention import token_map

    model = tiny_vit(img_size=(16, 40))  # 2 x 5 patches
    x = torch.randn(1, 3, 16, 40)
    for method in ("rollout", "last-layer"):
        _, grid = token_map(model, x, method)
        attn = all_attentions(model, x).double()
        matrix = rollout(attn) if method == "rollout" else attn[-1].mean(0)
        row = matrix[0, 1:].numpy()
        want = np.array([[row[r * 5 + c] for c in range(5)] for r in range(2)])  # patch (r, c) is token 1 + 5r + c
        np.testing.assert_allclose(grid.double().numpy(), want / want.max(), atol=1e-5, err_msg=method)


@pytest.mark.parametrize("interpolation", ["bicubic", "nearest"])
def test_prepare_resizes_the_whole_image_with_the_models_interpolation(interpolation):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from vitkit.inspect.attention import prepare

    model = tiny_vit()
    model.preprocess.update(interpolation=interpolation, crop_pct=0.75, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    img = Image.fromarray(photo(6, (53, 37)))
    x, size = prepare(model, img)
    assert size == (37, 53)
    whole = TF.resize(img, [32, 32], interpolation=InterpolationMode[interpolation.upper()], antialias=True)
    want = (torch.from_numpy(np.array(whole)).permute(2, 0, 1) / 255 - torch.tensor([0.4, 0.5, 0.6])[:, None, None]) \
        / torch.tensor([0.2, 0.3, 0.25])[:, None, None]
    torch.testing.assert_close(x[0], want, atol=1e-5, rtol=0)


def test_grid_distances_on_a_non_square_grid():
    from vitkit.inspect import figure7

    grid = (2, 3)
    cells = [(r, c) for r in range(2) for c in range(3)]
    want = np.array([[math.dist(a, b) for b in cells] for a in cells])
    np.testing.assert_allclose(figure7.grid_distances(grid), want)


def test_position_summary_numbers(tmp_path):
    from vitkit.inspect import figure7

    model = tiny_vit(img_size=(32, 48))
    out = figure7.position_figure(model, tmp_path / "p.png")
    pos = torch.nn.functional.normalize(model.pos_embed[0, 1:].detach().double(), dim=-1).numpy()
    sim = pos @ pos.T
    cells = [(r, c) for r in range(4) for c in range(6)]
    dist = np.array([[math.dist(a, b) for b in cells] for a in cells])
    assert out["neighbours_mean"] == pytest.approx(sim[dist == 1].mean(), abs=1e-5)
    assert out["mean_by_distance"]["2.000"] == pytest.approx(sim[np.isclose(dist, 2)].mean(), abs=1e-5)
    assert out["mean_by_distance"]["0.000"] == pytest.approx(1, abs=1e-5)


def test_position_similarity_without_class_token():
    from vitkit.inspect import figure7

    model = tiny_vit(pool="gap", class_token=False)
    sim = figure7.position_similarity(model)
    pos = torch.nn.functional.normalize(model.pos_embed[0].detach().double(), dim=-1).numpy()
    assert sim.shape == (16, 16)
    np.testing.assert_allclose(sim, pos @ pos.T, atol=1e-5)


def test_attention_distance_summary_fields(tmp_path):
    from vitkit.inspect import figure7

    model = tiny_vit()  # depth 3, 2 heads, 4x4 grid of 8-pixel patches
    dist = np.array([[1.0, 3.0], [5.0, 7.0], [9.0, 11.0]])
    out = figure7.distance_figure(model, tmp_path / "d.png", dist, 4, "given images")
    assert out["per_layer_mean"] == [2.0, 6.0, 10.0]
    assert out["per_layer_head"] == dist.tolist() and out["images"] == 4 and out["unit"] == "pixels"
    cells = [(r, c) for r in range(4) for c in range(4)]
    assert out["uniform_attention"] == pytest.approx(np.mean([math.dist(a, b) for a in cells for b in cells]) * 8)


def test_default_samples_folder_is_the_checkouts_shared_folder():
    from vitkit.inspect import figure7

    root = next((p for p in Path(figure7.__file__).resolve().parents if (p / "pyproject.toml").is_file()), None)
    if root is None:
        pytest.skip("vitkit is installed, not run from a source checkout")
    shared = root.parent / "shared" / "data" / "imagenet-samples"
    assert figure7.SAMPLES[-1] == shared


def test_default_samples_folder_is_found_from_where_vitkit_runs(tmp_path, monkeypatch):
    """../shared/data/imagenet-samples as the README says: from the current folder (an installed vitkit has no
    checkout beside it)."""
    from vitkit.inspect import figure7

    samples = tmp_path / "shared" / "data" / "imagenet-samples"
    samples.mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(samples / "n0_x.JPEG")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(figure7, "SAMPLES", [figure7.SAMPLES[0], tmp_path / "nowhere"])
    paths, source = figure7.default_images()
    assert [p.name for p in paths] == ["n0_x.JPEG"] and Path(source).resolve() == samples


def _captured_figures(monkeypatch):
    """Replaces attention_figure: records (image, amap, path) and writes a placeholder file."""
    from vitkit.inspect import cli

    seen = []

    def fake(image, amap, title, path):
        seen.append((image, amap, Path(path)))
        Path(path).write_bytes(b"png")
    monkeypatch.setattr(cli, "attention_figure", fake)
    return seen


def test_attention_command_draws_the_chosen_head_at_the_images_size(ckpt, tmp_path, monkeypatch):
    from vitkit.inspect import attention_map

    path, model = ckpt
    img = tmp_path / "wide.png"
    Image.fromarray(photo(7, (70, 30))).save(img)
    seen = _captured_figures(monkeypatch)
    out = tmp_path / "maps"
    args = ["attention", str(img), "--weights", str(path), "-o", str(out), "--method", "head", "--layer", "0",
            "--head", "1"]
    assert vitkit_main(args) == 0
    (image, amap, target), = seen
    assert target == out / "wide_layer0-head1.png"
    assert amap.shape == (30, 70)
    np.testing.assert_allclose(amap, attention_map(model, img, "head", layer=0, head=1), atol=1e-6)
    assert not np.allclose(amap, attention_map(model, img, "head", layer=1, head=0), atol=1e-3)  # the test can tell


def test_negative_layer_is_named_by_its_index(ckpt, tmp_path, monkeypatch):
    path, _ = ckpt
    img = tmp_path / "x.png"
    Image.fromarray(photo(8)).save(img)
    seen = _captured_figures(monkeypatch)
    args = ["attention", str(img), "--weights", str(path), "-o", str(tmp_path / "maps"), "--method", "head",
            "--layer", "-1", "--head", "-1"]
    assert vitkit_main(args) == 0
    assert seen[0][2].name == "x_layer2-head1.png"


def test_attention_picture_follows_the_images_orientation(tmp_path):
    from vitkit.inspect.cli import attention_figure

    sizes = {}
    for name, (h, w) in {"tall": (120, 40), "wide": (40, 120)}.items():
        image = photo(9, (w, h))
        amap = np.linspace(0, 1, h * w).reshape(h, w)
        attention_figure(image, amap, name, tmp_path / f"{name}.png")
        with Image.open(tmp_path / f"{name}.png") as pic:
            sizes[name] = pic.size
    assert sizes["tall"][1] > 2 * sizes["wide"][1]  # 3 tall panels need a far taller picture than 3 wide ones


def test_attention_failure_count_counts_empty_folders(ckpt, tmp_path, monkeypatch, capsys):
    path, _ = ckpt
    img = tmp_path / "x.png"
    Image.fromarray(photo(10)).save(img)
    (tmp_path / "empty").mkdir()
    _captured_figures(monkeypatch)
    args = ["attention", str(img), str(tmp_path / "empty"), "--weights", str(path), "-o", str(tmp_path / "maps")]
    assert vitkit_main(args) == 1
    # an empty folder is not an image that failed: it is counted on its own
    assert capsys.readouterr().err.strip().splitlines()[-1] == "vitkit attention: 1 input named no images"
    (tmp_path / "bad.jpg").write_text("not an image")
    args[2:2] = [str(tmp_path / "bad.jpg")]
    assert vitkit_main(args + ["--force"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "vitkit attention: 1 of 2 images failed; 1 input named no images"


# --- review: nested captures, models without blocks or RGB input, memory, large grids -------------------------
def test_nested_captures_each_get_every_layer_they_asked_for():
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with vitkit.capture_attention(model) as outer:
            attention_map(model, x[0])  # captures inside, as the library's own helpers do
            with vitkit.capture_attention(model, -1) as inner:
                model(x)
            model(x[:1])  # the outer block's last call
        direct = all_attentions(model, x[:1])
    assert sorted(inner) == [2] and inner[2].shape[0] == 2
    assert sorted(outer) == [0, 1, 2] and all(torch.allclose(outer[i][0], direct[i]) for i in range(3))
    assert all(not m.probs_sinks for m in model.modules() if isinstance(m, Attention))


NO_BLOCKS = (dict(depth=0), "the model has no transformer blocks, so no attention to show")
ONE_CHANNEL = (dict(in_chans=1), "the model takes 1-channel input, and images are read as RGB (3 channels)")


@pytest.mark.parametrize("command, model, reason", [  # (a model without blocks still classifies)
    ("attention", *NO_BLOCKS), ("inspect", *NO_BLOCKS),
    ("attention", *ONE_CHANNEL), ("inspect", *ONE_CHANNEL), ("predict", *ONE_CHANNEL)])
def test_models_the_commands_cannot_use_are_one_line(tmp_path, capsys, command, model, reason):
    path = vitkit.save_model(tiny_vit(**model), tmp_path / "m.safetensors")
    Image.fromarray(photo(size=(40, 30))).save(tmp_path / "p.png")
    args = {"attention": ["attention", str(tmp_path / "p.png"), "-o", str(tmp_path / "out")],
            "inspect": ["inspect", "-o", str(tmp_path / "out"), "--images", str(tmp_path / "p.png")],
            "predict": ["predict", str(tmp_path / "p.png")]}[command]
    assert vitkit_main([*args, "--weights", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"vitkit {command}: error: --weights {path}: {reason}\n" and not (tmp_path / "out").exists()
    if "in_chans" in model:  # and from Python
        with pytest.raises(ValueError, match="1-channel input"):
            attention_map(tiny_vit(**model), tmp_path / "p.png")
        with pytest.raises(ValueError, match="1-channel input"):
            list(vitkit.classify(tiny_vit(**model), [tmp_path / "p.png"]))


def test_attention_beyond_memory_is_refused_before_computing(tmp_path, capsys, monkeypatch):
    import vitkit.api

    path = vitkit.save_model(tiny_vit(), tmp_path / "m.safetensors")
    Image.fromarray(photo(size=(40, 30))).save(tmp_path / "p.png")
    # 3 layers x 2 heads x 1025^2 tokens x 4 bytes, kept and copied: about 50 MB at 256 px
    monkeypatch.setattr(vitkit.api, "available_memory", lambda: 40 * 2**20)
    assert vitkit_main(["attention", str(tmp_path / "p.png"), "--weights", str(path), "--img-size", "256",
                        "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitkit attention: error: keeping the attention of 3 layers for 256x256 px (1024 patches) "
                          "takes about 0.0 GiB") and err.endswith("give a smaller --img-size\n")
    assert vitkit_main(["attention", str(tmp_path / "p.png"), "--weights", str(path), "-o", str(tmp_path / "out")]) == 0
    # inspect's attention distance goes one image at a time where a batch of 8 would not fit
    model = tiny_vit(img_size=128)
    one = figure7.attention_bytes(model, (1, 3, 128, 128))
    monkeypatch.setattr(vitkit.api, "available_memory", lambda: 3 * one)
    calls = []
    real = figure7.forward_with_attention
    monkeypatch.setattr(figure7, "forward_with_attention", lambda m, x: calls.append(len(x)) or real(m, x))
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue", "white", "black")]
    dist, count = figure7.attention_distances(model, images)
    assert count == 5 and calls == [3, 2] and np.isfinite(dist).all()


@pytest.mark.parametrize("img_size", [(384, 384), (224, 448)])
def test_position_similarity_picture_shows_every_cell(tmp_path, img_size):
    """Alternating +1/-1 similarities: every one must reach the picture as its own stripe (nothing dropped)."""
    model = vitkit.ViT(vitkit.ViTConfig(img_size=img_size, patch_size=16, width=32, depth=1, num_heads=2, mlp_dim=32))
    h, w = model.cfg.grid
    stripes = np.where(np.arange(h * w) % 2 == 0, 1.0, -1.0)[None].repeat(h * w, 0)
    real = figure7.position_similarity
    try:
        figure7.position_similarity = lambda m: stripes
        figure7.position_figure(model, tmp_path / "sim.png")
    finally:
        figure7.position_similarity = real
    with Image.open(tmp_path / "sim.png") as img:
        pixels = np.asarray(img.convert("RGB")).astype(int)
    yellow, purple = (np.abs(pixels - np.array(matplotlib_colour(v))).sum(-1) < 30 for v in (1.0, -1.0))
    label = np.where(yellow, 1, np.where(purple, -1, 0))
    # runs of one colour along a row through a tile row: one per cell, w cells in each of the w tiles (and the
    # colour bar's, where that row crosses it at either end of its scale)
    runs = ((label[:, 1:] != label[:, :-1]) & (label[:, 1:] != 0)).sum(axis=1) + (label[:, 0] != 0)
    assert w * w <= runs.max() <= w * w + 2, (runs.max(), w)


def matplotlib_colour(value):
    import matplotlib

    return [round(255 * c) for c in matplotlib.colormaps["viridis"]((value + 1) / 2)[:3]]


def test_a_one_patch_grid_draws_without_warnings(tmp_path, recwarn):
    model = tiny_vit(img_size=8)
    figure7.write_figure7(model, tmp_path, [Image.new("RGB", (8, 8), "red")], "one image")
    assert not [w for w in recwarn if "ylim" in str(w.message)]
    assert all((tmp_path / name).exists() for name in figure7.FIGURES)


# --- probe findings: names, titles, reruns, large photos, the label -------------------------------------------
def test_output_names_never_collide_and_a_rerun_skips_its_own_maps(ckpt, tmp_path, monkeypatch):
    path, _ = ckpt
    for folder, name in (("d1", "a.png"), ("d3", "a-2.png"), ("d2", "a.png")):
        (tmp_path / folder).mkdir()
        Image.fromarray(photo(11, (40, 30))).save(tmp_path / folder / name)
    seen = _captured_figures(monkeypatch)
    inputs = [str(tmp_path / "d1/a.png"), str(tmp_path / "d3/a-2.png"), str(tmp_path / "d2/a.png")]
    assert vitkit_main(["attention", *inputs, "--weights", str(path), "-o", str(tmp_path / "maps")]) == 0
    assert [s[2].name for s in seen] == ["a_rollout.png", "a-2_rollout.png", "a-3_rollout.png"]  # was a-2 twice
    seen.clear()  # maps written into the folder being walked are not read back as inputs by the next run
    args = ["attention", str(tmp_path / "d1"), "--weights", str(path), "-o", str(tmp_path / "d1/maps")]
    assert vitkit_main(args) == 0 and vitkit_main([*args, "--force"]) == 0
    assert [s[2].name for s in seen] == ["a_rollout.png", "a_rollout.png"]


def test_titles_are_literal_and_one_bad_output_name_stops_nothing(tmp_path, capsys):
    """'$5 and $6' in a file or class name was read as matplotlib maths: a traceback that stopped the batch."""
    model = tiny_vit()
    model.class_names = [f"price_${i}_to_${i + 1}" for i in range(5)]
    path = vitkit.save_model(model, tmp_path / "m.safetensors")
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("cost_$5_and_$6.png", "x" * 250 + ".png", "z.png"):
        Image.fromarray(photo(12, (40, 30))).save(folder / name)
    assert vitkit_main(["attention", str(folder), "--weights", str(path), "-o", str(tmp_path / "maps")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "cannot write (File name too long)" in err[0] and err[1].endswith("1 of 3 images failed")
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["cost_$5_and_$6_rollout.png", "z_rollout.png"]


def test_the_label_is_predicts_and_a_large_photo_is_drawn_at_screen_size(ckpt, tmp_path, monkeypatch, capsys):
    """The map covers the whole image, squeezed to the model's input; the label is the top class `vitkit predict`
    gives (resized and center-cropped), which differs for a wide photo."""
    path, model = ckpt
    img = tmp_path / "wide.png"
    Image.fromarray(photo(13, (3000, 1000))).save(img)
    seen = _captured_figures(monkeypatch)
    assert vitkit_main(["attention", str(img), "--weights", str(path), "-o", str(tmp_path / "maps")]) == 0
    top, = next(vitkit.classify(model, [img], top_k=1))["top_k"]
    assert f"(predicted: {top['label']} ({top['prob']:.1%}))" in capsys.readouterr().out
    image, amap, _ = seen[0]
    assert image.size == (2048, 683) and amap.shape == (683, 2048)  # not 3000x1000 drawn three times


def test_output_a_terminal_cannot_encode_is_escaped(ckpt, tmp_path, monkeypatch):
    import io
    import sys

    path, _ = ckpt
    img = tmp_path / "ünï 猫.png"
    Image.fromarray(photo(14, (40, 30))).save(img)
    _captured_figures(monkeypatch)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert vitkit_main(["attention", str(img), "--weights", str(path), "-o", str(tmp_path / "maps")]) == 0
    stdout.flush()
    assert "\\xfcn\\xef \\u732b.png -> " in stdout.buffer.getvalue().decode("ascii")  # was a UnicodeEncodeError


def test_python_api_takes_folders_and_refuses_raw_pixel_tensors(ckpt, tmp_path):
    _, model = ckpt
    for i in range(2):
        Image.fromarray(photo(15 + i, (40, 30))).save(tmp_path / f"{i}.png")
    one = figure7.attention_distances(model, str(tmp_path / "0.png"))  # one path, not its characters
    both = figure7.attention_distances(model, [tmp_path])  # a folder, walked as on the command line
    assert one[1] == 1 and both[1] == 2 and not np.allclose(one[0], both[0])
    failed = []
    assert figure7.attention_distances(model, [Image.new("RGB", (0, 0)), tmp_path / "0.png"], failed.append)[1] == 1
    assert [str(e) for e in failed] == ["the image is empty (0x0 pixels)"]
    with pytest.raises(ValueError, match="a torch.uint8 tensor is raw pixels, not a preprocessed image"):
        attention_map(model, torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8))
    with pytest.raises(ValueError, match="attention distance is measured at the model's 32x32"):
        figure7.attention_distances(model, [torch.randn(3, 64, 64)])
