"""``dar import``, ``dar graft`` and ``dar export``: the subcommands of this package, added to the
``dar`` parser by ``add_parsers`` and run through ``COMMANDS`` (``dar_core/cli.py``)."""

from __future__ import annotations

import argparse

from dar_core.spec.config import QUERY_VARIANTS, preset_names


def add_parsers(sub: argparse._SubParsersAction) -> None:
    im = sub.add_parser("import", help="a DiT/SiT .pt checkpoint to a dar checkpoint "
                                       "(weights_only loading, EMA by default)")
    im.add_argument("path", help="the DiT/SiT .pt file")
    im.add_argument("--model", required=True, metavar="PRESET",
                    help=f"architecture, e.g. SiT-XL/2 (one of {', '.join(preset_names())})")
    im.add_argument("--out", required=True, help="the dar checkpoint to write (.safetensors)")
    im.add_argument("--key", choices=("ema", "model"), default=None,
                    help="weights to take (default: 'ema', else 'model', else a bare state dict)")
    im.add_argument("--image-size", type=int, default=None,
                    help="image side in pixels (latents are 1/8 of it; default: the file's "
                         "args, else 256)")
    im.add_argument("--num-classes", type=int, default=None,
                    help="classes without the null class (default: the file's args, else 1000)")
    im.add_argument("--prediction", choices=("velocity", "noise"), default=None,
                    help="what the network predicts (default: the file's args, else DiT-* "
                         "noise, SiT-* velocity); only velocity models import")

    gr = sub.add_parser("graft", help="DAR routing on a trained dar checkpoint (function-"
                                      "preserving for chunk size 1)")
    gr.add_argument("path", help="the source dar checkpoint")
    gr.add_argument("--query", choices=QUERY_VARIANTS, required=True)
    gr.add_argument("--chunk-size", type=int, required=True)
    gr.add_argument("--final-aggregator", action=argparse.BooleanOptionalAction, default=True)
    gr.add_argument("--out", required=True, help="the grafted checkpoint to write")
    gr.add_argument("--measure", type=int, default=0, metavar="N",
                    help="report the relative output change on N probe inputs (float64 "
                         "reference; slow for large models)")

    ex = sub.add_parser("export", help="a residual dar checkpoint as a SiT state dict (.pt)")
    ex.add_argument("path", help="the dar checkpoint")
    ex.add_argument("out", help="the .pt file to write")
    ex.add_argument("--to", required=True, choices=("sit",))
    ex.add_argument("--weights", choices=("ema", "params"), default="ema")
    ex.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True,
                    help="add zero learned-variance rows, as SiT's models.py builds by default "
                         "(--no-learn-sigma: for SiT(learn_sigma=False))")


def cmd_import(args: argparse.Namespace) -> None:
    from dar_core.pretrained.convert import import_file

    report = import_file(args.path, args.model, args.out, key=args.key,
                         image_size=args.image_size, num_classes=args.num_classes,
                         prediction=args.prediction)
    for line in report.lines():
        print(line)
    print(f"wrote {args.out}")


def cmd_graft(args: argparse.Namespace) -> None:
    from dar_core.errors import ConfigError
    from dar_core.pretrained.graft import graft_file

    if args.measure < 0:
        raise ConfigError(f"--measure must be >= 0, got {args.measure}")
    cfg, notes, deviation = graft_file(args.path, args.out, args.query, args.chunk_size,
                                       args.final_aggregator, args.measure)
    r = cfg.routing
    print(f"routing: dar, query {r.query}, chunk size {r.chunk_size}, final aggregator "
          f"{'on' if r.final_aggregator else 'off'}, time gain {'on' if r.time_gain else 'off'}")
    for line in notes:
        print(line)
    if deviation is not None:
        print(f"relative output change on {args.measure} probe inputs: {deviation:.3e}")
    print(f"wrote {args.out}")


def cmd_export(args: argparse.Namespace) -> None:
    from dar_core.pretrained.convert import export_file

    out = export_file(args.path, args.to, args.out, weights=args.weights,
                      learn_sigma=args.learn_sigma)
    print(f"wrote {out}")


COMMANDS = {"import": cmd_import, "graft": cmd_graft, "export": cmd_export}
