"""Sample quality: the shipped NumPy evaluator network (``evaluator``), Fréchet distance, KID
and accuracies (``metrics``), and the fixed checkpoint-scoring protocol (``protocol``)."""
