"""Every tolerance of the suite, in one table (mirrored in README.md with the reasons).

Errors are ``max |a - b| / max |b|`` (``dar_core.testing.rel_err``) unless named otherwise.
"""

TOL = {
    # float32 forward vs the float64 reference: ~1e-7 per op, a few hundred ops deep.
    ("forward", "float32"): 1e-4,
    # float32 vs float32 between backends: two independent float32 errors.
    ("forward_pair", "float32"): 2e-4,
    # the loss is one mean over outputs: tighter than the worst element.
    ("loss", "float32"): 1e-5,
    # gradients: per parameter, max|g - g64| <= rtol * max|g64| + atol * (largest gradient).
    ("grad_rtol", "float32"): 2e-3,
    ("grad_atol", "float32"): 2e-5,
    # the routing op alone: softmax of a handful of dot products.
    ("route", "float32"): 2e-6,
    ("route_grad", "float32"): 2e-5,
    # bf16 (8-bit mantissa): outputs to a few percent, gradients by direction.
    ("forward", "bfloat16"): 6e-2,
    ("grad_cosine", "bfloat16"): 0.99,
    # samplers compound the forward error over the steps (Heun: 2 evaluations per step).
    ("sample", "float32"): 1e-3,
    # checkpoints move float32 arrays bit for bit; the loaded model's output vs the writer's.
    ("checkpoint", "float32"): 2e-4,
}


def tol(kind: str, dtype: str = "float32") -> float:
    return TOL[(kind, dtype)]
