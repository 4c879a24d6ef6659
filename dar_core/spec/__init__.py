"""The specification layer: what a DAR model *is*, independent of any framework.

Configs and presets, the routing math (source sets, aggregation), the parameter schema, the
timestep embedding, the interpolant and the float64 reference forward pass (docs/spec.md).
Imports only NumPy, array-api-compat and ``dar_core.errors`` / ``dar_core.xp``.
"""
