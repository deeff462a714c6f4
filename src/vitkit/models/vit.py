"""Vision Transformer (Dosovitskiy et al., ICLR 2021), in one file.

Image -> patches (conv, stride = patch; or a BiT ResNet stem / small conv stem + 1x1 patches, hybrid) ->
[class] token + learned position embeddings -> pre-LN encoder blocks -> LayerNorm -> pool -> head.
Parameter names follow timm, so timm state dicts load as they are; the other formats are renamed to
these in `vitkit.weights`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .convstem import ConvStem, stem_strides
from .resnetv2 import ResNetV2Stem

# width, depth, mlp_dim, heads (paper Table 1; Ti and S from DeiT / AugReg)
WIDTHS = {"Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "B": (768, 12, 3072, 12),
          "L": (1024, 24, 4096, 16), "H": (1280, 32, 5120, 16)}


@dataclass
class ViTConfig:
    patch_size: int = 16
    img_size: tuple[int, int] = (224, 224)
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    in_chans: int = 3
    pool: str = "token"  # "token": the [class] token's output; "gap": mean of the patch tokens
    class_token: bool = True
    distilled: bool = False  # DeiT's distillation token after [class], with its own head: logits average the two
    fc_norm: bool = False  # gap only: LayerNorm after pooling (timm/BEiT) rather than before (Google)
    representation_size: int | None = None  # pre-logits layer (Linear + tanh), the paper's pre-training head
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    hybrid_layers: tuple[int, ...] | None = None  # ResNet-v2 stage depths, e.g. (3, 4, 9) for R50
    hybrid_width: int = 64  # ResNet-v2 root width (stage i has 4 * 2**i times as many channels)
    conv_stem: tuple[int, ...] | None = None  # widths of 3x3 conv+BN+GELU layers before the patches; a wider
    # layer than the previous one has stride 2, e.g. (32, 64, 64, 128): 4x smaller (hybrid for small images)
    conv_stem_pool: bool = False  # conv_stem halves the resolution by a 2x2 max-pool instead of stride 2
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth rate of the last block (linearly increasing)
    dynamic_img_size: bool = False  # accept other input sizes by resampling position embeddings per call
    zero_head: bool = False  # zero-initialise the classifier (fine-tuning, paper Appendix B.1.1)

    def __post_init__(self):
        def whole(v) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        if whole(self.img_size):
            self.img_size = (self.img_size, self.img_size)
        if isinstance(self.img_size, (str, bytes)) or not isinstance(self.img_size, Iterable) \
                or len(sizes := tuple(self.img_size)) != 2 or not all(whole(v) for v in sizes):
            raise ValueError(f"img_size must be an int or a (height, width) pair of ints, not {self.img_size!r}")
        self.img_size = tuple(int(v) for v in sizes)
        ints = ("patch_size", "width", "depth", "num_heads", "mlp_dim", "num_classes", "in_chans", "hybrid_width")
        if bad := [k for k in ints if not whole(getattr(self, k))] + \
                  (["representation_size"] if self.representation_size is not None
                   and not whole(self.representation_size) else []):
            raise ValueError(f"{bad[0]} must be an int, not {type(getattr(self, bad[0])).__name__} "
                             f"{getattr(self, bad[0])!r}")
        rates = {k: getattr(self, k) for k in ("dropout", "attn_dropout", "drop_path")}
        if bad := [k for k, v in rates.items() if isinstance(v, bool) or not isinstance(v, numbers.Real)
                   or not 0 <= v <= 1]:
            raise ValueError(f"{bad[0]} must be a number in [0, 1], not {rates[bad[0]]!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, numbers.Real) or not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive number, not {self.norm_eps!r}")
        for k in ("hybrid_layers", "conv_stem"):  # stage depths, layer widths: positive ints
            if (v := getattr(self, k)) is not None:
                if isinstance(v, (str, bytes)) or not isinstance(v, Iterable) or \
                        not all(whole(n) and n > 0 for n in tuple(v)):
                    raise ValueError(f"{k} must be positive ints, not {v!r}")
                setattr(self, k, tuple(v))
        if self.conv_stem is not None and (self.hybrid_layers or not self.conv_stem):
            raise ValueError("conv_stem needs at least one layer and excludes hybrid_layers")
        if self.hybrid_layers and (self.hybrid_width < 32 or self.hybrid_width % 32):
            raise ValueError(f"hybrid_width must be a multiple of 32 (GroupNorm's 32 groups), not {self.hybrid_width}")
        if self.pool not in ("token", "gap"):
            raise ValueError(f"pool must be 'token' or 'gap', not {self.pool!r}")
        if (self.pool == "token" or self.distilled) and not self.class_token:
            raise ValueError("pool='token' and distilled=True need class_token=True")
        if self.distilled and self.pool != "token":
            raise ValueError("distilled=True reads its two tokens: it needs pool='token'")
        sizes = dict(patch_size=self.patch_size, img_size=min(self.img_size), width=self.width, in_chans=self.in_chans,
                     num_heads=self.num_heads, mlp_dim=self.mlp_dim, depth=self.depth + 1,
                     num_classes=self.num_classes + 1)
        if bad := [k for k, v in sizes.items() if v < 1]:  # depth and num_classes may be 0 (no blocks, no head)
            raise ValueError(f"{bad[0]} must be {'>= 0' if bad[0] in ('depth', 'num_classes') else 'positive'}, "
                             f"not {getattr(self, bad[0])}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if any(s % self.reduction for s in self.img_size):
            raise ValueError(f"img_size {self.img_size[0]}x{self.img_size[1]} is not a multiple of the patch size "
                             f"{self.reduction}" + (" (the stem's downsampling included)" if self.reduction !=
                                                    self.patch_size else ""))

    @property
    def reduction(self) -> int:
        """Input pixels per token along each axis."""
        if self.conv_stem:
            return self.patch_size * 2 ** stem_strides(self.conv_stem).count(2)
        return self.patch_size * (4 * 2 ** (len(self.hybrid_layers) - 1) if self.hybrid_layers else 1)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.img_size[0] // self.reduction, self.img_size[1] // self.reduction)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ViT config fields: {sorted(unknown)}")
        return cls(**d)


def resample_pos_embed(pos: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                       num_prefix: int = 1, mode: str = "bicubic", antialias: bool = True,
                       align_corners: bool = False) -> torch.Tensor:
    """Resample (1, prefix + h*w, D) position embeddings to another grid in 2D; prefix tokens are kept.

    Bicubic with antialiasing (only matters when shrinking) as timm does; same as transformers when growing.
    Checkpoint readers pass their codebase's own choice (e.g. torchvision: align_corners=True).
    """
    if pos.ndim != 3:
        raise ValueError(f"position embeddings of shape {tuple(pos.shape)}: (1, prefix + h*w, D) is expected")
    new_grid = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    if old_grid is None:
        side = math.isqrt(grid.shape[1])
        if side * side != grid.shape[1]:
            raise ValueError(f"cannot infer the grid of {grid.shape[1]} position embeddings; give old_grid")
        old_grid = (side, side)
    if not torch.compiler.is_compiling() and tuple(old_grid) == tuple(new_grid):  # (the same size: exact anyway)
        return pos
    dim = pos.shape[-1]
    grid = grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, antialias=antialias, align_corners=align_corners)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - rate)
    return x * keep / (1 - rate) if rate < 1 else x * keep  # rate 1: every branch dropped (no 0/0)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool, attn_dropout: float, dropout: float):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout, self.proj_drop = attn_dropout, nn.Dropout(dropout)
        self.probs_sinks: list[list] = []  # one per capture_attention() open on this layer (they may nest)

    def forward(self, x: torch.Tensor, first: int | None = None) -> torch.Tensor:
        """first: attend from the first `first` tokens alone (keys and values from all) -> (B, first, C)."""
        B, N, C = x.shape
        H = self.num_heads
        if first is not None:  # skip the other tokens' queries: slices of the one qkv projection
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :first], w[:C], None if b is None else b[:C]).view(B, first, H, C // H).transpose(1, 2)
            k, v = F.linear(x, w[C:], None if b is None else b[C:]).view(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.qkv(x).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        if not self.probs_sinks:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:  # the unfused path, only while someone asked for the probabilities
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            for sink in self.probs_sinks:
                sink[:] = [attn]  # the last call's alone
            x = F.dropout(attn, p, self.training) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, q.shape[2], C)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg.width, cfg.num_heads, cfg.qkv_bias, cfg.attn_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim, cfg.dropout)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, first: int | None = None) -> torch.Tensor:
        """first: compute the outputs of the first `first` tokens alone -> (B, first, D)."""
        y = drop_path(self.attn(self.norm1(x), first), self.drop_path_rate, self.training)
        x = (x if first is None else x[:, :first]) + y
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        cin = cfg.in_chans
        if cfg.hybrid_layers:
            self.backbone = ResNetV2Stem(cfg.hybrid_layers, cfg.in_chans, cfg.hybrid_width)
            cin = self.backbone.out_channels
        elif cfg.conv_stem:
            self.backbone = ConvStem(cfg.conv_stem, cfg.in_chans, cfg.conv_stem_pool)
            cin = self.backbone.out_channels
        self.proj = nn.Conv2d(cin, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D, h, w)
        if hasattr(self, "backbone"):
            x = self.backbone(x)
        return self.proj(x)


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.preprocess: dict = dict(DEFAULT_PREPROCESS)  # how inputs must be prepared (set by the loaders)
        self.class_names: list[str] | None = None
        self.stated_stats = False  # whether loaded weights said their input mean and std (a plain timm file: no)
        self.multi_label = False  # the head scores each class on its own: probabilities are sigmoids, not a softmax
        # how the weights' own codebase resamples position embeddings (resample_pos_embed options; set by the
        # loaders and kept in vitkit checkpoints, so a converted model changes resolution as its source would)
        self.pos_resample: dict = {}
        D = cfg.width
        self.num_prefix_tokens = int(cfg.class_token) + int(cfg.distilled)
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.distilled else None
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_prefix_tokens + math.prod(cfg.grid), D) * 0.02)
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cfg.drop_path * i / max(cfg.depth - 1, 1)) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps) if not cfg.fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.fc_norm else nn.Identity()
        self.pre_logits = nn.Linear(D, cfg.representation_size) if cfg.representation_size else None
        self.head_drop = nn.Dropout(cfg.dropout)
        self.num_features, self.embed_dim = cfg.representation_size or D, D
        self.grad_checkpointing = False
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.head_dist = None if not cfg.distilled else \
            nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.apply(_init_weights)
        if cfg.zero_head:
            self.reset_head(cfg.num_classes)

    def reset_head(self, num_classes: int) -> None:
        """Replace the classifier by a zero-initialised one (what the paper does for fine-tuning)."""
        self.cfg.num_classes = num_classes
        device, dtype = self.pos_embed.device, self.pos_embed.dtype  # a model built on "meta" for loading gets a
        heads = ["head"] + (["head_dist"] if self.cfg.distilled else [])  # real head; a bf16 model a bf16 one
        for name in heads:
            with torch.device("cpu" if device.type == "meta" else device):
                setattr(self, name, nn.Linear(self.num_features, num_classes, dtype=dtype) if num_classes else
                        nn.Identity())
            if num_classes:
                nn.init.zeros_(getattr(self, name).weight), nn.init.zeros_(getattr(self, name).bias)

    # timm's names for these, so code written for timm models runs on vitkit's
    def reset_classifier(self, num_classes: int) -> None:
        self.reset_head(num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def no_weight_decay(self) -> set[str]:
        """Parameters that take no weight decay besides biases and norms (timm/DeiT's choice)."""
        return {"pos_embed", "cls_token", "dist_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them: less memory, about
        a third more compute (for L and H, or large batches)."""
        self.grad_checkpointing = enable

    @property
    def pretrained_cfg(self) -> dict:
        """model.preprocess as timm's data config (timm.data.resolve_data_config reads it)."""
        return {**self.preprocess, "input_size": (self.cfg.in_chans, *self.cfg.img_size)}

    def _block(self, blk: Block, x: torch.Tensor, first: int | None = None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, first, use_reentrant=False)
        return blk(x, first)

    # --- tokens -------------------------------------------------------------------------------
    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.pos_embed
        # traced (torch.export / compile) with dynamic_img_size: resampled always, no branch on the input's size
        # (which would pin the traced graph to one size); at the model's own size that is exact
        traced = self.cfg.dynamic_img_size and torch.compiler.is_compiling()
        if traced or grid != self.cfg.grid:
            if not self.cfg.dynamic_img_size:
                want = self.cfg.img_size
                raise ValueError(f"input is {grid[0] * self.cfg.reduction}x{grid[1] * self.cfg.reduction} px but the "
                                 f"model expects {want[0]}x{want[1]}; resize it, or create the model with "
                                 f"img_size=... or dynamic_img_size=True")
            pos = resample_pos_embed(pos, grid, self.cfg.grid, self.num_prefix_tokens, **self.pos_resample)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        return self.pos_drop(x + pos)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pixels -> (tokens with [class] and position embeddings, patch grid)."""
        r = self.cfg.reduction
        symbolic = isinstance(x, torch.fx.Proxy)  # FX tracing (torchvision's create_feature_extractor): no sizes
        if not symbolic:
            self._check_input(x)
            if x.shape[-2] % r or x.shape[-1] % r:
                raise ValueError(f"input size {tuple(x.shape[-2:])} is not a multiple of the patch size {r}")
        x = self.patch_embed(x)
        grid = self.cfg.grid if symbolic else tuple(x.shape[-2:])
        return self._pos_embed(x.flatten(2).transpose(1, 2), grid), grid

    def _check_input(self, x) -> None:
        """What torch would report deep inside the patch embedding, said in terms of the model's input."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input: a torch.Tensor (B, C, H, W) is expected, not {type(x).__name__}"
                            + ("; torch.from_numpy(x) makes one" if type(x).__module__ == "numpy" else ""))
        c = self.cfg.in_chans
        if x.dim() != 4:  # a single image reached the patches as a batch of 3 and failed at the [class] token
            raise ValueError(f"input of shape {tuple(x.shape)}: a batch (B, C, H, W) is expected"
                             + ("; add the batch dimension with x[None]" if x.dim() == 3 else ""))
        if x.shape[1] != c:
            raise ValueError(f"input of shape {tuple(x.shape)}: the model takes {c} channels, (B, {c}, H, W)"
                             + ("; this looks like (B, H, W, C): x.permute(0, 3, 1, 2)" if x.shape[-1] == c else ""))
        if not x.is_floating_point():  # e.g. uint8 from torchvision.io.read_image
            raise TypeError(f"input of dtype {x.dtype}: the model takes float pixels normalised as model.preprocess "
                            f"says (mean {self.preprocess['mean']}, std {self.preprocess['std']})")
        own = self.pos_embed.dtype
        if x.dtype != own and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"input of dtype {x.dtype}, the model's weights {own}: x.to({own}), or run it under "
                            f"torch.autocast")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> all output tokens (B, prefix + h*w, D), after the final LayerNorm."""
        x, _ = self.embed(x)
        for blk in self.blocks:
            x = self._block(blk, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.cfg.distilled:  # DeiT at inference (and fine-tuning without a teacher): the two heads averaged
            x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])  # as timm's VisionTransformerDistilled
            return (x + x_dist) / 2 if pre_logits else (self.head(x) + self.head_dist(x_dist)) / 2
        x = x[:, 0] if self.cfg.pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.fc_norm(x)
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool != "token" or not self.blocks or self.blocks[-1].attn.probs_sinks or self._watched(x):
            return self.forward_head(self.forward_features(x))
        # Only the [class] (and distillation) token reaches the head, so the last block needs every token's keys
        # and values but the query, attention output and MLP of those alone: the same logits with ~1/16 fewer
        # FLOPs at depth 12. forward_features, capture_attention and hooks on the last block see every token.
        x, _ = self.embed(x)
        for blk in self.blocks[:-1]:
            x = self._block(blk, x)
        return self.forward_head(self.norm(self._block(self.blocks[-1], x, self.num_prefix_tokens)))

    def _watched(self, x) -> bool:
        """Whether a forward hook looks at the last block or the final norm (Grad-CAM, feature taps), or FX traces
        the model (feature extraction): that expects every token there, as in timm, so the [class]-token-only last
        block is skipped."""
        if isinstance(x, torch.fx.Proxy):
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for part in (self.blocks[-1], self.norm)
                   for m in part.modules())

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's forward_intermediates: the outputs of the chosen blocks (default all; an int n: the last n), in
        block order, as patch tokens: 2D maps (B, D, h, w) with output_fmt "NCHW", (B, h*w, D) with "NLC";
        return_prefix_tokens: each as (patch tokens, prefix tokens (B, prefix, D)). norm: the final LayerNorm on
        each. Returns (final features, intermediates), or the intermediates alone with intermediates_only (then, or
        with stop_early, the blocks after the last chosen one are not run)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt {output_fmt!r}: use 'NCHW' or 'NLC'")
        depth = len(self.blocks)
        if isinstance(indices, int) and not 0 < indices <= depth:
            raise IndexError(f"the last {indices} blocks: the model has {depth} blocks")
        idx = range(depth) if indices is None else range(depth - indices, depth) if isinstance(indices, int) else indices
        if bad := [i for i in idx if not -depth <= i < depth]:
            raise IndexError(f"block index {bad[0]} is out of range: the model has {depth} blocks")
        if not (idx := sorted({i % depth for i in idx})):
            raise IndexError("no blocks chosen" if depth else "the model has no blocks")
        x, grid = self.embed(x)
        outs = []
        for i, blk in enumerate(self.blocks[: idx[-1] + 1 if intermediates_only or stop_early else depth]):
            x = self._block(blk, x)
            if i in idx:
                y = self.norm(x) if norm else x
                prefix, y = y[:, : self.num_prefix_tokens], y[:, self.num_prefix_tokens:]
                if output_fmt == "NCHW":
                    y = y.transpose(1, 2).reshape(*y.shape[::2], *grid)  # (B, D, h, w), an empty batch too
                outs.append((y, prefix) if return_prefix_tokens else y)
        return outs if intermediates_only else (self.norm(x), outs)


DEFAULT_PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9, "interpolation": "bicubic"}


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias) if m.bias is not None else None
    elif isinstance(m, ViT) and m.cls_token is not None:
        nn.init.normal_(m.cls_token, std=1e-6)
        if m.dist_token is not None:
            nn.init.trunc_normal_(m.dist_token, std=0.02)


@contextlib.contextmanager
def capture_attention(model: nn.Module, layers: int | list[int] | None = None):
    """Collect attention probabilities during the calls made inside the block.

        with capture_attention(model) as attn:
            model(x)
        attn[i]  # (B, heads, N, N) of block i, from the last call

    layers: the blocks to capture (an index or a list of them, negative from the end); None: all. attn is keyed
    by block number from 0 (layers=-1 of 12 blocks: attn[11]).

    The chosen blocks switch to the unfused softmax path only inside the block; afterwards the model is
    exactly as before (fused attention, nothing kept).
    """
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no ViT attention layers")

    def index(i) -> bool:  # an int, a numpy or a one-element torch integer; not a bool
        if isinstance(i, bool) or (isinstance(i, torch.Tensor) and i.dtype == torch.bool):
            return False
        try:
            operator.index(i)
        except TypeError:
            return False
        return True

    if index(layers):
        layers = [operator.index(layers)]
    elif layers is not None:
        given = layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable) or \
                getattr(layers, "ndim", 1) == 0 or not all(map(index, layers := list(layers))):
            raise TypeError(f"layers: a block index or a list of them, not {given!r}")
        layers = [operator.index(i) for i in layers]
    chosen = range(len(modules)) if layers is None else [i % len(modules) for i in layers]
    bad = [i for i in (layers or []) if not -len(modules) <= i < len(modules)]
    if bad:
        raise IndexError(f"layer index {bad[0]} out of range: the model has {len(modules)} blocks")
    sinks = {i: [] for i in chosen}
    result: dict[int, torch.Tensor] = {}
    try:
        for i, sink in sinks.items():
            modules[i].probs_sinks.append(sink)
        yield result
    finally:
        for i, sink in sinks.items():
            modules[i].probs_sinks = [s for s in modules[i].probs_sinks if s is not sink]
            if sink:
                result[i] = sink[-1]
