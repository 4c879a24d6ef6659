"""What every backend's training loop shares: ``TrainConfig``, the batch stream as a pure
function of ``(seed, step)``, the run folder, logging, checkpoint and sample cadence
(``run``). Built on ``spec``, ``sampling`` and ``io``."""
