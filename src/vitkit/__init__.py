"""vitkit: Vision Transformers ("An Image is Worth 16x16 Words") in PyTorch."""
from .api import create_model, load_model, save_model
from .models import ViT, ViTConfig, capture_attention, list_models, resample_pos_embed
from .predict import classify
from .train.cli import train_model
from .train.evaluate import evaluate_model
from .weights import CheckpointError

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ViT", "ViTConfig", "capture_attention", "classify", "create_model", "evaluate_model",
           "list_models", "load_model", "resample_pos_embed", "save_model", "train_model"]
