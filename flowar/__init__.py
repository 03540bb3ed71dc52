"""FlowAR: scale-wise autoregressive image generation with a flow-matching head."""

from .collaborative import CollaborativePipeline, collaborative_sample
from .config import PRESETS, FlowARConfig, FlowARSampling, get_preset
from .editing import inpaint
from .flexvar import FlexVAR, FlexVARSampleOutput
from .flexvar_config import FLEXVAR_PRESETS, FlexVARConfig, FlexVARSampling, get_flexvar_preset
from .flexvar_pipeline import FlexVARPipeline
from .model import FlowAR, FlowAROutput, SampleOutput
from .pipeline import FlowARPipeline
from .registry import load_model, load_pipeline
from .var import VAR, VAROutput, VARSampleOutput
from .var_config import VAR_PRESETS, VARConfig, VARSampling, get_var_preset
from .var_pipeline import VARPipeline
from .xar import XAR, XAROutput
from .xar_config import XAR_PRESETS, XARConfig, XARSampling, get_xar_preset
from .xar_pipeline import XARPipeline

__all__ = ["PRESETS", "FlowAR", "FlowARConfig", "FlowAROutput", "FlowARPipeline", "FlowARSampling", "SampleOutput",
           "get_preset", "VAR", "VAROutput", "VARSampleOutput", "VAR_PRESETS", "VARConfig", "VARSampling",
           "get_var_preset", "VARPipeline", "FlexVAR", "FlexVARSampleOutput", "FLEXVAR_PRESETS", "FlexVARConfig",
           "FlexVARSampling", "get_flexvar_preset", "FlexVARPipeline", "load_model", "load_pipeline", "CollaborativePipeline",
           "collaborative_sample", "inpaint", "XAR", "XAROutput", "XAR_PRESETS", "XARConfig", "XARSampling",
           "get_xar_preset", "XARPipeline"]
