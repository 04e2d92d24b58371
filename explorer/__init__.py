"""MoE Compression Explorer: see inside transformers MoE models and prototype their compression."""
from .data import Dataset, DataError, TokenBlocks, load_data, text_blocks
from .loading import DEMO_MODEL, ModelLoadError, load_model
from .layout import NoMoELayersError
from .moe import MoELayer, MoEModel
from .perplexity import Perplexity, perplexity
from .stats import RouterStats, collect_stats, token_routes

__all__ = [
    "DEMO_MODEL", "DataError", "Dataset", "ModelLoadError", "MoELayer", "MoEModel", "NoMoELayersError",
    "Perplexity", "RouterStats", "TokenBlocks", "collect_stats", "load_data", "load_model", "perplexity",
    "text_blocks", "token_routes",
]
