"""Inspecting a ViT (paper section 4.5): attention maps (rollout, last layer, one head) and Figure 7."""
from .attention import METHODS, all_attentions, attention_map, forward_with_attention, rollout
from .figure7 import (mean_attention_distance, position_similarity, attention_distances, filter_components,
                      write_figure7)

__all__ = ["METHODS", "all_attentions", "attention_distances", "attention_map", "filter_components",
           "forward_with_attention", "mean_attention_distance", "position_similarity", "rollout", "write_figure7"]
