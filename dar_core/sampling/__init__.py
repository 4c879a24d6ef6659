"""Sampling: ODE/SDE samplers over a ``velocity(x, t, y)`` callable (``samplers``) and the
sampling of a checkpoint through any backend (``from_checkpoint``). Built on ``spec``."""
