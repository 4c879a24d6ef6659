"""Train the procedural-data evaluator and write
``dar_core/evaluation/assets/evaluator-{size}.safetensors``.

    python benchmarks/train_evaluator.py --image-size 16
    python benchmarks/train_evaluator.py --image-size 32

The network is the architecture of ``dar_core.evaluation.evaluator`` (3x3 convolutions, global
average pool, a class head and one head per factor) with batch norm after each convolution during
training; batch norm is folded into the convolution weights when the file is written, so the
NumPy inference in the core is conv + bias + GELU only.

Choices, and why:

* **All 24 classes by default.** Class ``c`` is the same shape/texture pair for every
  ``num_classes`` (the class table is a prefix), so one evaluator trained on all 24 scores
  models trained on any subset, and a sample that drifts into a combination its model never
  saw is reported as that combination instead of being forced onto a trained class.
* **No augmentation.** The training stream is infinite (``train_batch(step)`` renders fresh
  images for every step), so there is nothing to overfit, and the dataset's nuisance factors
  already cover position, size, colour and polarity. Extra invariances (blur, noise) would
  make the features blind to the very defects the Fréchet distance is meant to see.
* **Deterministic.** Fixed torch seed, deterministic algorithms, one intra-op thread by
  default (reductions split across threads may round differently), and data addressed by
  step. The same command writes the same tensors and the same metadata (so the metadata
  holds no timings; the training time is printed). The bytes can still differ: safetensors
  does not fix the order of the metadata keys in the header.
* **Checked before writing.** The held-out accuracy of the *NumPy* evaluator built from the
  exported tensors must reach ``--min-accuracy`` and its outputs must match the torch model
  (max relative error < 1e-4); otherwise nothing is written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch
import torch.nn.functional as F
from torch import nn

from dar_core.evaluation.evaluator import Evaluator, EvaluatorSpec
from dar_core.io.checkpoint import atomic_write_bytes
from dar_core.io.data import ProceduralDataset
from dar_core.io.data.procedural import MAX_CLASSES
from dar_core.testing import rel_err

REPO = Path(__file__).resolve().parents[1]
BN_EPS = 1e-5
PARITY_RTOL = 1e-4
HELDOUT_N = 2000


class TorchEvaluator(nn.Module):
    """Training-time twin of ``dar_core.evaluation.evaluator.Evaluator`` (plus batch norm)."""

    def __init__(self, spec: EvaluatorSpec) -> None:
        super().__init__()
        self.spec = spec
        convs, norms = [], []
        c_in = 3
        for c_out, stride in zip(spec.channels, spec.strides):
            convs.append(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False))
            norms.append(nn.BatchNorm2d(c_out, eps=BN_EPS))
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.act = nn.GELU(approximate="tanh")
        heads = {"class": spec.num_classes}
        heads.update({n: len(v) for n, v in zip(spec.factor_names, spec.factor_values)})
        self.heads = nn.ModuleDict({k: nn.Linear(spec.feature_dim, n) for k, n in heads.items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h = x  # [B, 3, H, W]
        for conv, norm in zip(self.convs, self.norms):
            h = self.act(norm(conv(h)))  # [B, C_i, H_i, W_i]
        feats = h.mean(dim=(2, 3))  # [B, F]
        return feats, {k: head(feats) for k, head in self.heads.items()}

    @torch.no_grad()
    def export(self) -> dict[str, np.ndarray]:
        """Canonical tensors with batch norm (running statistics) folded into each conv."""
        out: dict[str, np.ndarray] = {}
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
            w = conv.weight.double() * scale[:, None, None, None]
            b = norm.bias.double() - norm.running_mean.double() * scale
            out[f"conv.{i}.weight"] = w.float().numpy()
            out[f"conv.{i}.bias"] = b.float().numpy()
        for k, head in self.heads.items():
            out[f"head.{k}.weight"] = head.weight.float().numpy().copy()
            out[f"head.{k}.bias"] = head.bias.float().numpy().copy()
        return out


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def accuracies(ev: Evaluator, ds: ProceduralDataset, x: np.ndarray, y: np.ndarray
               ) -> dict[str, float]:
    out = ev.outputs(x)
    acc = {"class": float(np.mean(out.logits.argmax(1) == y))}
    factors = ds.class_factors(y)
    for i, name in enumerate(ds.factor_names):
        acc[name] = float(np.mean(out.factor_logits[name].argmax(1) == factors[:, i]))
    return acc


def parity(model: TorchEvaluator, ev: Evaluator, x: np.ndarray) -> float:
    """Max relative error of the NumPy evaluator against the torch model in eval mode."""
    model.eval()
    with torch.no_grad():
        feats, heads = model(torch.from_numpy(x))
    out = ev.outputs(x)
    errs = [rel_err(out.features, feats.double().numpy()),
            rel_err(out.logits, heads["class"].double().numpy())]
    errs += [rel_err(out.factor_logits[k], heads[k].double().numpy())
             for k in ev.spec.factor_names]
    return max(errs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-size", type=int, choices=(16, 32), required=True)
    ap.add_argument("--num-classes", type=int, default=MAX_CLASSES)
    ap.add_argument("--dataset-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="torch initialisation seed")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps (default 1500 at 16 px, 1000 at 32 px)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-accuracy", type=float, default=0.97,
                    help="refuse to write a file whose held-out class accuracy is lower")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args(argv)

    size = args.image_size
    steps = args.steps or (1500 if size == 16 else 1000)
    out_path = args.out or (REPO / "dar_core" / "evaluation" / "assets"
                            / f"evaluator-{size}.safetensors")

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)

    ds = ProceduralDataset(image_size=size, num_classes=args.num_classes,
                           seed=args.dataset_seed)
    base = EvaluatorSpec.default(size)
    spec = EvaluatorSpec(image_size=size, channels=base.channels, strides=base.strides,
                         num_classes=args.num_classes,
                         factor_names=tuple(ds.factor_names),
                         factor_values=tuple(tuple(ds.factor_values[n])
                                             for n in ds.factor_names))
    model = TorchEvaluator(spec)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"evaluator {size}px: channels {spec.channels}, strides {spec.strides}, "
          f"{n_params} trainable parameters, {steps} steps x {args.batch_size}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    warmup = max(1, steps // 20)
    t0 = time.perf_counter()
    model.train()
    running = 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr, warmup)
        xb, yb = ds.train_batch(step, args.batch_size)
        fb = ds.class_factors(yb)
        x, y = torch.from_numpy(xb), torch.from_numpy(yb)
        _, heads = model(x)
        loss = F.cross_entropy(heads["class"], y)
        for i, name in enumerate(ds.factor_names):
            loss = loss + F.cross_entropy(heads[name], torch.from_numpy(fb[:, i]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            print(f"non-finite loss at step {step}", file=sys.stderr)
            return 1
        running += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            n = (step % args.log_every) + 1
            print(f"step {step + 1:5d}  loss {running / n:.4f}  "
                  f"{time.perf_counter() - t0:7.1f}s", flush=True)
            running = 0.0
    train_seconds = time.perf_counter() - t0
    model.eval()

    spec_md = spec.to_metadata()
    params = model.export()
    ev = Evaluator(spec, params, spec_md, source="<trained>")
    x_ho, y_ho = ds.heldout(HELDOUT_N)
    err = parity(model, ev, x_ho[:512])
    acc = accuracies(ev, ds, x_ho, y_ho)
    print(f"trained in {train_seconds:.1f}s; held-out accuracy (n={HELDOUT_N}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in acc.items())
          + f"; NumPy vs torch max rel err {err:.2e}", flush=True)
    if not err < PARITY_RTOL:
        print(f"NumPy inference disagrees with torch: max rel err {err:.3e} >= {PARITY_RTOL}",
              file=sys.stderr)
        return 1
    if acc["class"] < args.min_accuracy:
        print(f"held-out class accuracy {acc['class']:.4f} is below --min-accuracy "
              f"{args.min_accuracy}; not writing {out_path}", file=sys.stderr)
        return 1

    metadata = dict(spec_md)
    metadata.update({
        "dataset": "ProceduralDataset",
        "dataset_seed": str(args.dataset_seed),
        "init_seed": str(args.seed),
        "train_steps": str(steps),
        "batch_size": str(args.batch_size),
        "lr": repr(args.lr),
        "weight_decay": repr(args.weight_decay),
        "num_parameters": str(sum(v.size for v in params.values())),
        "torch_version": torch.__version__,
        "heldout": json.dumps({"n": HELDOUT_N, "split": "ProceduralDataset.heldout",
                               "accuracy": acc}, sort_keys=True),
        "parity_max_rel_err": f"{err:.3e}",
    })
    data = safetensors.numpy.save(params, metadata=metadata)
    check = Evaluator.from_bytes(data, source=str(out_path))
    again = accuracies(check, ds, x_ho, y_ho)
    if again != acc:
        print(f"re-read file gives different accuracies {again} vs {acc}", file=sys.stderr)
        return 1
    atomic_write_bytes(out_path, data)
    out_path.chmod(0o644)  # a package asset: readable by everyone (temp files start 0600)
    print(f"wrote {out_path} ({len(data) / 1024:.0f} KiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
