"""The ``dar`` command: ``train``, ``sample`` (PNG grids, or ADM npz files for FID),
``diagnose``, ``eval``, ``consolidate``, ``fid``, ``conformance``, ``import``, ``graft``,
``export``, ``prepare``.

``dar train`` takes every TrainConfig field as a flag (``--lr 3e-4 --query dynamic``), so the
command line and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

from dar_core.backend import BACKENDS, load_backend
from dar_core.diagnostics.symptoms import DEFAULT_TIMESTEPS
from dar_core.errors import DARError
from dar_core.io.checkpoint import writable_folder, writable_parent
from dar_core.pretrained.cli import COMMANDS as PRETRAINED_COMMANDS
from dar_core.pretrained.cli import add_parsers as add_pretrained_parsers
from dar_core.sampling.samplers import SAMPLERS
from dar_core.train.run import TrainConfig


def _add_config_flags(p: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        typ = type(f.default)
        if typ is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=f.default)
        else:
            p.add_argument(flag, dest=f.name, type=typ, default=f.default,
                           help=f"(default: {f.default!r})")


def _parse_labels(s: str | None) -> list[int] | None:
    if not s:
        return None
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise DARError(f"--labels must be comma-separated integers, got {s!r}") from None


def build_parser(train_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The ``dar`` parser; ``train_defaults`` (from ``--config``) replace the train flags'
    defaults, so flags given on the command line still win."""
    ap = argparse.ArgumentParser(prog="dar", description="Diffusion-Adaptive Routing")
    ap.add_argument("--debug", action="store_true",
                    help="show the traceback of an error instead of its one-line message")
    sub = ap.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a DiT/SiT with DAR or residual routing")
    tr.add_argument("--backend", choices=BACKENDS, default="torch")
    tr.add_argument("--config", default=None,
                    help="a TOML file of these flags' fields (flags given here override it)")
    _add_config_flags(tr, TrainConfig)
    if train_defaults:
        tr.set_defaults(**train_defaults)

    sp = sub.add_parser("sample", help="sample a PNG grid from a checkpoint, or N images into "
                        "an ADM-format npz for FID (--num-samples N --npz OUT.npz)")
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto")
    sp.add_argument("--sampler", choices=SAMPLERS, default="heun")
    sp.add_argument("--steps", type=int, default=50)
    sp.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale")
    sp.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0),
                    metavar=("LO", "HI"))
    sp.add_argument("--labels", default=None, help="comma-separated labels (default: all)")
    sp.add_argument("--per-class", type=int, default=8)
    sp.add_argument("--weights", choices=("ema", "params"), default="ema")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--out", default=None, help="PNG path (default: next to the checkpoint)")
    sp.add_argument("--save-npz", default=None, help="also save the raw samples (npz)")
    sp.add_argument("--vae", default=None, help="the VAE of a latent dataset, where its "
                    "manifest's path is not on this machine")
    sp.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                    help="decode the samples of a latent model with its data's VAE")
    sp.add_argument("--num-samples", type=int, default=None,
                    help="bulk mode for FID: sample N images into --npz (ADM's uint8 NHWC "
                         "arr_0), one or many processes (torchrun, JAX, mlx.launch), resumable")
    sp.add_argument("--npz", default=None, help="output of --num-samples (OUT.npz)")
    sp.add_argument("--batch-size", type=int, default=64,
                    help="images per batch and per resumable part with --num-samples")
    sp.add_argument("--class-labels", choices=("balanced", "random"), default="balanced",
                    help="with --num-samples: label i %% num_classes, or a per-index draw")
    dg = sub.add_parser("diagnose", help="state/gradient magnitudes, redundancy, routing maps")
    dg.add_argument("--checkpoint", action="append", required=True,
                    help="repeat to compare checkpoints (e.g. residual vs DAR)")
    dg.add_argument("--timesteps", type=float, nargs="+", default=list(DEFAULT_TIMESTEPS))
    dg.add_argument("--n", type=int, default=32, help="evaluation batch size")
    dg.add_argument("--backend", choices=("auto", "reference") + BACKENDS, default="auto")
    dg.add_argument("--weights", choices=("ema", "params"), default="ema")
    dg.add_argument("--out", default="diagnostics")
    ev = sub.add_parser("eval", help="FD / KID / accuracy of a checkpoint's samples under a "
                                     "fixed protocol (same noise and labels for every model)")
    ev.add_argument("--checkpoint", action="append", required=True, help="repeatable")
    ev.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto")
    ev.add_argument("--n-per-class", type=int, default=100)
    ev.add_argument("--sampler", choices=SAMPLERS, default="heun")
    ev.add_argument("--steps", type=int, default=50)
    ev.add_argument("--cfg", type=float, default=1.0)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--weights", choices=("ema", "params"), default="ema")
    ev.add_argument("--out", default=None, help="write all results as JSON here")
    ev.add_argument("--force", action="store_true",
                    help="score a checkpoint trained on other data than the procedural set")

    co = sub.add_parser("consolidate", help="a sharded checkpoint (--shard runs) to the single "
                                            "safetensors file every backend loads")
    co.add_argument("checkpoint", help="a ckpt-<step>.sharded folder, or a run folder (its newest)")
    co.add_argument("--out", default=None,
                    help="the file to write (default: beside the folder, .safetensors)")

    fd = sub.add_parser("fid", help="FID / sFID / IS / precision-recall of an ADM-format "
                                     "sample npz (InceptionV3 from a local weights file)")
    fd.add_argument("samples", help="npz with arr_0 uint8 [N, H, W, 3] (dar sample --npz)")
    fd.add_argument("--ref", required=True, help="reference npz: ADM's reference batch "
                    "(mu, sigma, mu_s, sigma_s, arr_0) or any arr_0 image npz")
    fd.add_argument("--inception", default=None, help="FID InceptionV3 weights "
                    "(pt_inception-2015-12-05-6726825d.pth; default: $DAR_INCEPTION_WEIGHTS "
                    "or ~/.cache/dar/)")
    fd.add_argument("--device", default="auto")
    fd.add_argument("--batch-size", type=int, default=100, help="Inception batch size")
    fd.add_argument("--out", default=None, help="write the results as JSON here")
    cf = sub.add_parser("conformance", help="check that the installed backends agree with the "
                                            "float64 reference and each other, on this machine")
    cf.add_argument("--backends", default=os.environ.get("DAR_BACKENDS") or ",".join(BACKENDS),
                    help="comma-separated (default: $DAR_BACKENDS or all; those not installed "
                         "are reported as skipped)")
    cf.add_argument("--device", default="cpu", choices=("cpu", "cuda", "tpu", "gpu"),
                    help="device kind every backend runs on (gpu: Apple silicon)")
    cf.add_argument("--profile", default="ci", choices=("ci", "thorough"),
                    help="Hypothesis examples per property: ci 12, thorough 200")
    cf.add_argument("--report", default=None, help="write the JSON report here")
    cf.add_argument("--select", default=None, help="only tests matching this pytest -k expression")
    add_pretrained_parsers(sub)  # import, graft, export
    from dar_core.io.data.prepare import add_parser as add_prepare_parser

    add_prepare_parser(sub)  # prepare
    return ap


def cmd_conformance(args: argparse.Namespace) -> int:
    from dar_core.conformance.run import headline, run

    rc = run([b.strip() for b in args.backends.split(",") if b.strip()], args.device,
             args.profile, args.report, args.select)
    print(headline())
    if args.report:
        print(f"report: {args.report}")
    return rc


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from dar_core.evaluation.protocol import evaluate_checkpoint
    from dar_core.io.checkpoint import atomic_write_bytes

    if args.out:
        writable_parent(args.out)  # before the sampling, not after it
    results = []
    for ck in args.checkpoint:
        r = evaluate_checkpoint(ck, backend=args.backend, n_per_class=args.n_per_class,
                                sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg,
                                seed=args.seed, weights=args.weights, force=args.force,
                                progress=True)
        results.append(r)
        print(f"{ck}: FD {r['fd']:.3f} (real floor {r['fd_real_floor']:.3f})  "
              f"KID {r['kid']:.4f}  class acc {r['class_accuracy']:.3f}  "
              f"shape {r['shape_accuracy']:.3f}  texture {r['texture_accuracy']:.3f}")
    if args.out:
        atomic_write_bytes(args.out, json.dumps(results, indent=1).encode())
        print(f"wrote {args.out}")


def cmd_diagnose(args: argparse.Namespace) -> None:
    from dar_core.diagnostics.symptoms import diagnose, headline, write_report

    writable_folder(args.out, "--out")  # before the passes, not after them
    result = diagnose(args.checkpoint, tuple(args.timesteps), n=args.n, backend=args.backend,
                      weights=args.weights, progress=True)
    for line in headline(result):
        print(line)
    for p in write_report(result, args.out):
        print(f"wrote {p}")


def cmd_train(args: argparse.Namespace) -> None:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    run_dir = load_backend(args.backend).train(tc)
    if run_dir is not None:
        print(f"run written to {run_dir}")


def cmd_sample(args: argparse.Namespace) -> None:
    if args.num_samples is not None:
        from dar_core.sampling.bulk import cmd_sample_npz

        return cmd_sample_npz(args)
    if args.npz:
        raise DARError("--npz is the output of --num-samples N; give both (or --save-npz "
                       "for the raw samples of a PNG grid)")
    from dar_core.sampling.from_checkpoint import sample_checkpoint

    out = args.out or str(Path(args.checkpoint).with_suffix("")) + f"-{args.sampler}.png"
    if args.save_npz:
        writable_parent(args.save_npz)  # before the sampling, not after it
    images, labels = sample_checkpoint(
        args.checkpoint, backend=args.backend, sampler=args.sampler, steps=args.steps,
        cfg_scale=args.cfg, guidance_interval=tuple(args.guidance_interval),
        labels=_parse_labels(args.labels), per_class=args.per_class, weights=args.weights,
        seed=args.seed, precision=args.precision, device=args.device, png=out, progress=True,
        decode=args.decode, vae=args.vae)
    if args.save_npz:
        np.savez(args.save_npz, x=images, y=labels)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train" and args.config:
            from dar_core.train.config_file import load_train_toml

            values = load_train_toml(args.config, TrainConfig, {"backend": (str,)})
            if values.get("backend", "torch") not in BACKENDS:
                raise DARError(f"{args.config}: backend must be one of {list(BACKENDS)}, "
                               f"got {values['backend']!r}")
            args = build_parser(values).parse_args(argv)
        commands = {"train": cmd_train, "sample": cmd_sample, "diagnose": cmd_diagnose,
                    "eval": cmd_eval, "conformance": cmd_conformance, **PRETRAINED_COMMANDS}
        from dar_core.evaluation.fid import cmd_fid

        commands["fid"] = cmd_fid
        from dar_core.io.sharded import cmd_consolidate

        commands["consolidate"] = cmd_consolidate
        from dar_core.io.data.prepare import cmd_prepare

        commands["prepare"] = cmd_prepare
        return commands[args.command](args) or 0
    except (DARError, OSError) as e:
        if args.debug:
            raise
        print(f"dar {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: Exception) -> str:
    """A DARError's message; for an OSError what failed and on which file (a full disk, a
    read-only folder, a missing path), without the traceback (``dar --debug`` shows it)."""
    if isinstance(e, OSError) and not isinstance(e, DARError):
        where = f" {str(e.filename)!r}" if e.filename else ""
        return f"{e.strerror or type(e).__name__}:{where} ({type(e).__name__})"
    return str(e).replace("\n", " ")


if __name__ == "__main__":
    sys.exit(main())
