"""FlowAR: scale-wise autoregressive image generation with a flow-matching head."""

from .config import PRESETS, FlowARConfig, get_preset
from .model import FlowAR, FlowAROutput, SampleOutput
from .pipeline import FlowARPipeline

__all__ = ["PRESETS", "FlowAR", "FlowARConfig", "FlowAROutput", "FlowARPipeline", "SampleOutput", "get_preset"]
