"""Released DiT/SiT weights in and out of dar, and DAR grafted onto trained models.

- ``convert.import_file`` / ``export_file``: a DiT/SiT ``.pt`` (read with
  ``torch.load(weights_only=True)``) to a residual dar checkpoint, and back (``dar import``,
  ``dar export --to sit``); the key-by-key mapping is ``sit``.
- ``graft.graft_params(params, src_cfg, dst_cfg)``: a model's parameters under another
  routing of the same architecture (``dar graft``, ``dar train --init-from``).

docs/spec.md §3.1 and §9.6 state the rules.
"""

from dar_core.pretrained.graft import graft_config, graft_deviation, graft_params

__all__ = ["graft_config", "graft_deviation", "graft_params"]
