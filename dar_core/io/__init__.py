"""Input and output: safetensors checkpoints (atomic writes), datasets, image grids, plots.
Built on ``spec``; knows nothing about training or backends."""
