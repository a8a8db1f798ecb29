"""The ``contraseg`` command line: parse arguments, call the library, print.

Bad input raises :class:`contraseg.errors.InputError` anywhere in the library; here it becomes
one line on stderr and exit status 2 (a traceback only with ``--debug``). Output folders are
checked (:func:`contraseg.fileio.check_out_dir`) before anything is written.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from contraseg import __version__
from contraseg.errors import InputError, TrainingError
from contraseg.fileio import check_out_dir

# a command's handler; it may return an exit status (None is 0)
Handler = Callable[[argparse.Namespace], int | None]
DEVICES = "auto, cpu, cuda or cuda:N (default auto: CUDA when available)"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (defaults are used without)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. optim.lr=3e-4 (`contraseg config show STAGE` lists the keys)",
    )


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    _add_config_args(parser)
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--device", default="auto", help=DEVICES)
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over instead of resuming from the last checkpoint",
    )
    _add_no_compile(parser)
    parser.add_argument(
        "--sync-batchnorm",
        action="store_true",
        help="under torchrun on GPUs: batch norm over every rank's images (default: its own)",
    )


def _add_no_compile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="never torch.compile the network (by default compiled on CUDA for long runs)",
    )


def _cmd_phantom(args: argparse.Namespace) -> None:
    from contraseg.data.phantom import write_phantom_dataset

    out = check_out_dir(args.out)
    write_phantom_dataset(
        out, volumes=args.volumes, size=args.size, seed=args.seed, preset=args.preset
    )
    print(f"wrote {args.volumes} {args.preset} phantom volumes to {out}")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from contraseg.config import PrepareRun, load_config
    from contraseg.data.cache import prepare_dataset

    shortcuts = [
        f"data.{key}={value}"
        for key, value in (("dataset", args.dataset), ("root", args.root), ("cache", args.cache))
        if value is not None
    ]
    if args.cache is not None:
        check_out_dir(args.cache, "--cache")
    config = load_config(PrepareRun, args.config, [*shortcuts, *args.overrides], sections=("data",))
    print(prepare_dataset(config.data).summary())


def _run_stage(args: argparse.Namespace, stage: str) -> None:
    """One stage; under ``torchrun --nproc_per_node=N`` every rank runs this (docs/training.md,
    "Speed and several GPUs") and leaves the process group at the end."""
    from contraseg.config import RUN_CLASSES, load_config
    from contraseg.training import joint, pretext, stages
    from contraseg.training.distributed import destroy_distributed
    from contraseg.training.trainer import Speed

    out = check_out_dir(args.out)
    config = load_config(RUN_CLASSES[stage], args.config, args.overrides)
    runner = {
        "pretrain-global": stages.run_pretrain_global,
        "pretrain-local": stages.run_pretrain_local,
        "pretrain-joint": joint.run_pretrain_joint,
        "pretrain-pretext": pretext.run_pretrain_pretext,
        "finetune": stages.run_finetune,
    }[stage]
    speed = Speed(compile=False if args.no_compile else None, sync_batchnorm=args.sync_batchnorm)
    try:
        runner(config, out, device=args.device, fresh=args.fresh, speed=speed)
    finally:
        destroy_distributed()


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from contraseg.evaluation.evaluate import evaluate_folders, evaluate_run

    out = None if args.out is None else check_out_dir(args.out)
    if args.run is not None:
        if args.pred is not None or args.ref is not None:
            raise InputError(None, "give either --run or --pred and --ref, not both")
        summary = evaluate_run(args.run, device=args.device, out_dir=out)
        where = out or Path(args.run) / "evaluation"
    else:
        if args.pred is None or args.ref is None:
            raise InputError(None, "give --run RUN, or --pred DIR and --ref DIR")
        summary = evaluate_folders(Path(args.pred), Path(args.ref), args.labels, out)
        where = out or Path(args.pred) / "evaluation"
    print(summary.format_table())
    print(f"tables in {where}")


def _cmd_predict(args: argparse.Namespace) -> int:
    from contraseg.inference import Segmenter, predict_to_folder

    out = check_out_dir(args.output, "--output")
    segmenter = Segmenter.from_pretrained(
        args.model, device=args.device, tta=args.tta, batch_size=args.batch_size
    )
    report = predict_to_folder(
        segmenter, Path(args.input), out, args.overwrite, args.save_probabilities
    )
    for error in report.failed:
        print(f"contraseg: error: {error}", file=sys.stderr)
    summary = f"{len(report.written)} label maps written to {out}"
    if report.skipped:
        summary += f", {len(report.skipped)} existing kept (--overwrite replaces them)"
    if report.failed:
        summary += f", {len(report.failed)} inputs failed"
    print(summary)
    return 2 if report.failed else 0


def _cmd_config_show(args: argparse.Namespace) -> None:
    import yaml

    from contraseg.config import RUN_CLASSES, describe, load_config, to_dict

    cls = RUN_CLASSES[args.stage]
    if args.config is None and not args.overrides:
        rows = describe(cls)
        width = max(len(key) for key, *_ in rows) + 2
        for key, type_name, default, help_text in rows:
            print(f"{key:<{width}}{type_name}  (default {default!r})\n{'':<{width}}{help_text}")
        return
    config = load_config(cls, args.config, args.overrides)
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")


def _cmd_experiment(args: argparse.Namespace) -> int:
    from contraseg.experiment import run_experiment

    result = run_experiment(
        args.config,
        check_out_dir(args.out),
        args.overrides,
        device=args.device,
        devices=args.devices,
        shard=args.shard,
        level=args.level,
        dry_run=args.dry_run,
        wait_timeout=args.wait_timeout,
        run=args.run,
        no_compile=args.no_compile,
    )
    return 0 if result.outcome is None or result.outcome.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from contraseg.demo import run_demo

    result = run_demo(
        check_out_dir(args.out), quick=args.quick, device=args.device, no_compile=args.no_compile
    )
    return 0 if result.outcome is None or result.outcome.ok else 1


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (tests and tools swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        """The stream is always the current ``sys.stderr``."""


def _configure_logging(debug: bool) -> None:
    """Library warnings (an unusual scan, say) as one line each on stderr; debug messages
    (what nibabel had to say about a header) only with ``--debug``."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("contraseg: %(levelname)s: %(message)s"))
    level = logging.DEBUG if debug else logging.WARNING
    handler.setLevel(level)
    logger = logging.getLogger("contraseg")
    logger.handlers[:] = [handler]
    logger.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="contraseg",
        description="Global and local contrastive pre-training for segmentation with few labels.",
    )
    parser.add_argument("--version", action="version", version=f"contraseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    # --debug is accepted after the command too; SUPPRESS keeps it from resetting the top one
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Handler, text: str, where: Any = sub
    ) -> argparse.ArgumentParser:
        p = where.add_parser(name, help=text, description=text, parents=[debug])
        p.set_defaults(handler=handler)
        return p

    p = command("phantom", _cmd_phantom, "Generate the cardiac phantom dataset in ACDC's layout.")
    p.add_argument("--out", required=True, help="folder to write patientXXX/ into")
    p.add_argument("--volumes", type=int, default=100, help="number of volumes (default 100)")
    p.add_argument("--size", type=int, default=96, help="in-plane size in pixels (default 96)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument(
        "--preset",
        choices=["paper", "easy"],
        default="paper",
        help="difficulty: 'paper' (default; one labelled volume scores ~0.6 Dice) or 'easy'",
    )

    p = command(
        "prepare",
        _cmd_prepare,
        "Preprocess a dataset into the .npy cache (the data.* keys of the training commands).",
    )
    p.add_argument("--dataset", help="shortcut for data.dataset=")
    p.add_argument("--root", help="shortcut for data.root= (the dataset folder)")
    p.add_argument("--cache", help="shortcut for data.cache= (default ROOT/.contraseg-cache)")
    _add_config_args(p)

    for name, text in (
        ("pretrain-global", "Stage 1: encoder + g1 with the global loss."),
        ("pretrain-local", "Stage 2: decoder blocks d_l + g2 with the local loss, encoder frozen."),
        ("finetune", "Stage 3: fine-tune the whole UNet on labelled volumes."),
        ("pretrain-joint", "Stages 1 and 2 at once: e, d_l, g1, g2 with L_g + lambda * L_l."),
        ("pretrain-pretext", "Baseline: pre-train on rotation, inpainting or context restoration."),
    ):
        p = command(name, functools.partial(_run_stage, stage=name), text)
        _add_run_args(p)

    p = command(
        "predict",
        _cmd_predict,
        "Segment new scans with a trained model (a finished finetune run or its bundle folder).",
    )
    p.add_argument(
        "-m",
        "--model",
        action="append",
        required=True,
        help="model folder (model.json + weights.safetensors); repeat to ensemble",
    )
    p.add_argument(
        "-i",
        "--input",
        required=True,
        help="a .nii/.nii.gz file, a folder of them, or an nnU-Net imagesTs folder "
        "({case}_0000, {case}_0001... are the channels of a case)",
    )
    p.add_argument(
        "-o", "--output", required=True, help="folder for the label maps ({case}.nii.gz)"
    )
    p.add_argument("--tta", action="store_true", help="average over in-plane flips (4x slower)")
    p.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write {case}.npz: class probabilities (K, X, Y, Z) as float16",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--batch-size", type=int, default=32, help="slices per forward pass (32)")
    p.add_argument("--device", default="auto", help=DEVICES)

    p = command(
        "evaluate",
        _cmd_evaluate,
        "3-D Dice and HD95: a finetune run on its test split, or a prediction folder against "
        "a reference folder.",
    )
    p.add_argument("--run", help="run directory of a finished finetune run")
    p.add_argument("--pred", help="folder of predicted label maps")
    p.add_argument("--ref", help="folder of reference label maps (matched by case name)")
    p.add_argument(
        "--labels",
        type=Path,
        help="dataset.json or model folder naming the classes (default: the values found)",
    )
    p.add_argument("--out", help="folder for the tables (default RUN/ or PRED/evaluation)")
    p.add_argument("--device", default="auto", help=DEVICES)

    text = "Show the config keys of a command."
    p = sub.add_parser("config", help=text, description=text, parents=[debug])
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = command(
        "show",
        _cmd_config_show,
        "Every key with type, default and help; with --config or key=value, the resolved config.",
        where=config_sub,
    )
    show.add_argument(
        "stage",
        choices=[
            "prepare",
            "pretrain-global",
            "pretrain-local",
            "finetune",
            "pretrain-joint",
            "pretrain-pretext",
        ],
    )
    _add_config_args(show)

    p = command(
        "experiment",
        _cmd_experiment,
        "Run a grid of pre-training and fine-tuning runs (a table of the paper) and report it.",
    )
    p.add_argument(
        "--config",
        type=Path,
        action="append",
        required=True,
        help="grid YAML file; repeat to merge more over it (configs/paper/grids/)",
    )
    p.add_argument("--out", required=True, help="experiment folder (runs, results, report)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="grid overrides, e.g. data.root=/data/ACDC",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="list the runs and estimate their time, run nothing"
    )
    p.add_argument("--device", default="auto", help=DEVICES)
    p.add_argument(
        "--devices",
        help="run in parallel, one worker per entry: GPU indices (0,1,2,3) or cpu,cpu",
    )
    p.add_argument(
        "--shard", help="i/n: take every n-th run of each level from the i-th (array jobs)"
    )
    p.add_argument(
        "--level",
        choices=[
            "pretrain-global",
            "pretrain-joint",
            "pretrain-pretext",
            "pretrain-local",
            "finetune",
        ],
        help="only this level's runs; a run whose dependency is not finished is not started",
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=86400.0,
        help="seconds a shard waits for another shard's run it needs (default 86400)",
    )
    _add_no_compile(p)
    p.add_argument("--run", help=argparse.SUPPRESS)  # a worker: this one run of the grid

    p = command("demo", _cmd_demo, "The whole method end to end on the embedded phantom.")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--quick", action="store_true", help="smaller and shorter (about 2 minutes)")
    p.add_argument("--device", default="auto", help=DEVICES)
    _add_no_compile(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.debug)
    try:
        code = args.handler(args)
    except InputError as err:
        if args.debug:
            raise
        print(f"contraseg: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        if args.debug:
            raise
        from contraseg.training.distributed import PeerFailed  # loaded by the training

        if isinstance(err, PeerFailed):  # another rank of a torchrun job printed its error
            return err.status
        print(f"contraseg: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("contraseg: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
