from .registry import build_config, list_models, preprocess_at, resolve
from .vit import ViT, ViTConfig, capture_attention, resample_pos_embed

__all__ = ["ViT", "ViTConfig", "build_config", "capture_attention", "list_models", "preprocess_at",
           "resample_pos_embed", "resolve"]
