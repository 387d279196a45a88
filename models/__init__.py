"""cmserve's model library: the network, the consistency parameterization, samplers, the file format."""

from .adm import ADMUNet
from .checkpoint import CheckpointError, CheckpointMeta, LoadedCheckpoint, load, recommended_sigmas, save
from .config import PRESETS, ModelConfig, preset
from .consistency import BACKBONES, ConsistencyModel, boundary_scalings, noise_conditioning
from .convert import ConvertError, load_folder
from .denoiser import Denoiser, heun_sample, sample_heun
from .sampling import default_sigmas, karras_sigmas, multistep_sample, sample, to_uint8
from .unet import UNet

__all__ = [
    "BACKBONES",
    "PRESETS",
    "ADMUNet",
    "CheckpointError",
    "CheckpointMeta",
    "ConsistencyModel",
    "ConvertError",
    "Denoiser",
    "LoadedCheckpoint",
    "ModelConfig",
    "UNet",
    "boundary_scalings",
    "default_sigmas",
    "heun_sample",
    "karras_sigmas",
    "load",
    "load_folder",
    "multistep_sample",
    "noise_conditioning",
    "preset",
    "recommended_sigmas",
    "sample",
    "sample_heun",
    "save",
    "to_uint8",
]
