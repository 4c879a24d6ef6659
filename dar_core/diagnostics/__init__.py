"""The paper's three symptoms and DAR's routing maps at every timestep (``symptoms``)."""
