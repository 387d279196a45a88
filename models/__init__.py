"""cmserve's model library: the network, the consistency parameterization, samplers, the file format."""

from .checkpoint import CheckpointError, CheckpointMeta, LoadedCheckpoint, load, recommended_sigmas, save
from .config import PRESETS, ModelConfig, preset
from .consistency import ConsistencyModel, boundary_scalings, noise_conditioning
from .sampling import default_sigmas, karras_sigmas, multistep_sample, sample, to_uint8
from .unet import UNet

__all__ = [
    "PRESETS",
    "CheckpointError",
    "CheckpointMeta",
    "ConsistencyModel",
    "LoadedCheckpoint",
    "ModelConfig",
    "UNet",
    "boundary_scalings",
    "default_sigmas",
    "karras_sigmas",
    "load",
    "multistep_sample",
    "noise_conditioning",
    "preset",
    "recommended_sigmas",
    "sample",
    "save",
    "to_uint8",
]
