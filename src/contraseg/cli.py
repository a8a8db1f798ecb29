"""The ``contraseg`` command line: parse arguments, call the library, print.

Bad input raises :class:`contraseg.errors.InputError` anywhere in the library; here it becomes
one line on stderr and exit status 2 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from contraseg.errors import InputError, TrainingError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (defaults are used without)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4"
    )


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument("--out", type=Path, required=True, help="run directory to write")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over instead of resuming from the last checkpoint",
    )


def _cmd_phantom(args: argparse.Namespace) -> None:
    from contraseg.data.phantom import write_phantom_dataset

    write_phantom_dataset(
        args.out, volumes=args.volumes, size=args.size, seed=args.seed, preset=args.preset
    )
    print(f"wrote {args.volumes} {args.preset} phantom volumes to {args.out}")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from contraseg.config import DataConfig, load_config
    from contraseg.data.cache import prepare_dataset

    overrides = [f"dataset={args.dataset}", f"root={args.root}", *args.overrides]
    if args.cache is not None:
        overrides.append(f"cache={args.cache}")
    data_config = load_config(DataConfig, args.config, overrides)
    prepared = prepare_dataset(data_config)
    print(prepared.summary())


def _cmd_pretrain_global(args: argparse.Namespace) -> None:
    from contraseg.config import PretrainGlobalRun, load_config
    from contraseg.training.stages import run_pretrain_global

    config = load_config(PretrainGlobalRun, args.config, args.overrides)
    run_pretrain_global(config, args.out, device=args.device, fresh=args.fresh)


def _cmd_pretrain_local(args: argparse.Namespace) -> None:
    from contraseg.config import PretrainLocalRun, load_config
    from contraseg.training.stages import run_pretrain_local

    config = load_config(PretrainLocalRun, args.config, args.overrides)
    run_pretrain_local(config, args.out, device=args.device, fresh=args.fresh)


def _cmd_finetune(args: argparse.Namespace) -> None:
    from contraseg.config import FinetuneRun, load_config
    from contraseg.training.stages import run_finetune

    config = load_config(FinetuneRun, args.config, args.overrides)
    run_finetune(config, args.out, device=args.device, fresh=args.fresh)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from contraseg.evaluation.evaluate import evaluate_run

    summary = evaluate_run(args.run, device=args.device)
    print(summary.format_table())


def _cmd_demo(args: argparse.Namespace) -> None:
    from contraseg.demo import run_demo

    run_demo(args.out, quick=args.quick, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="contraseg",
        description="Global and local contrastive pre-training for segmentation with few labels.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    # --debug is accepted after the command too; SUPPRESS keeps it from resetting the top one
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], None], text: str):
        p = sub.add_parser(name, help=text, description=text, parents=[debug])
        p.set_defaults(handler=handler)
        return p

    p = command("phantom", _cmd_phantom, "Generate the cardiac phantom dataset in ACDC's layout.")
    p.add_argument("--out", type=Path, required=True, help="folder to write patientXXX/ into")
    p.add_argument("--volumes", type=int, default=100, help="number of volumes (default 100)")
    p.add_argument("--size", type=int, default=96, help="in-plane size in pixels (default 96)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument(
        "--preset",
        choices=["paper", "easy"],
        default="paper",
        help="difficulty: 'paper' (default; one labelled volume scores ~0.6 Dice) or 'easy'",
    )

    p = command("prepare", _cmd_prepare, "Preprocess a dataset into the .npy cache.")
    p.add_argument(
        "--dataset",
        required=True,
        choices=["acdc", "phantom", "prostate", "mmwhs", "nnunet", "cityscapes"],
    )
    p.add_argument("--root", type=Path, required=True, help="dataset folder")
    p.add_argument("--cache", type=Path, help="cache folder (default: ROOT/.contraseg-cache)")
    _add_config_args(p)

    p = command(
        "pretrain-global", _cmd_pretrain_global, "Stage 1: encoder + g1 with the global loss."
    )
    _add_run_args(p)
    p = command(
        "pretrain-local",
        _cmd_pretrain_local,
        "Stage 2: decoder blocks d_l + g2 with the local loss, encoder frozen.",
    )
    _add_run_args(p)
    p = command("finetune", _cmd_finetune, "Stage 3: fine-tune the whole UNet on labelled volumes.")
    _add_run_args(p)

    p = command("evaluate", _cmd_evaluate, "Test-set 3-D Dice and HD95 of a fine-tuned run.")
    p.add_argument("--run", type=Path, required=True, help="run directory of a finetune run")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")

    p = command("demo", _cmd_demo, "The whole method end to end on the embedded phantom.")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    p.add_argument("--quick", action="store_true", help="smaller and shorter (about 2 minutes)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except InputError as err:
        if args.debug:
            raise
        print(f"contraseg: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        if args.debug:
            raise
        print(f"contraseg: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("contraseg: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
