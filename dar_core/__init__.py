"""dar_core: the backend-neutral specification of Diffusion-Adaptive Routing (DAR).

Importing this package loads NumPy and array-api-compat only; backends live in
``dar_core.backends.{torch,jax,mlx}`` and import their framework when imported themselves.
"""

from dar_core.errors import CheckpointError, ConfigError, DARError, InputError
from dar_core.spec.config import ModelConfig, RoutingConfig, model_config, preset_names
from dar_core.spec.routing import final_sources, route, source_sets, sublayer_sources
from dar_core.spec.schema import init_params, param_shapes

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DARError", "InputError", "ModelConfig", "RoutingConfig",
    "final_sources", "init_params", "model_config", "param_shapes", "preset_names", "route",
    "source_sets", "sublayer_sources", "__version__",
]
