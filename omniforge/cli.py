"""The `omniforge` command: demo | synth | encoders | train | eval | tokens."""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import sys
from pathlib import Path

from omniforge.errors import OmniforgeError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "recipes" / "models" / "capybara_7b.yaml"
TCMALLOC = "tcmalloc_minimal"
"""gperftools' malloc (Debian's libtcmalloc-minimal4, which `make install` installs)."""


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a command, not called
        rerun_under_tcmalloc()
    parser = argparse.ArgumentParser(prog="omniforge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="synthesise a world, train every stage, score every modality, report")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for world, run, checkpoint, report")
    demo.add_argument("--quick", action="store_true", help="small world, 1/12 of the steps (under 3 minutes)")
    demo.add_argument("--seed", type=int, default=0)

    synth = commands.add_parser("synth", help="write the synthetic multimodal world (JSONL + media + tokenizer)")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--quick", action="store_true", help="about a sixth of the records")

    encoders = commands.add_parser("encoders", help="pretrain the micro model's stand-in encoders on a synthetic world")
    encoders.add_argument("--world", type=Path, required=True, help="a folder written by `omniforge synth`")
    encoders.add_argument("--recipe", type=Path, default=None, help="default: recipes/micro_encoders.yaml")
    encoders.add_argument("--quick", action="store_true", help="a twentieth of the steps")

    train = commands.add_parser("train", help="run a recipe's stages (key=value overrides after the recipe)")
    train.add_argument("recipe", type=Path)
    train.add_argument("--stage", default=None, help="run only this stage (starting from the previous one's export)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    train.add_argument("--dry-run", action="store_true", help="validate, print the stage tables and token budgets")

    from omniforge.eval.cli import add_parser as add_eval_parser

    add_eval_parser(commands)

    tokens = commands.add_parser("tokens", help="what the model sees of each media file, and its token cost")
    tokens.add_argument("files", nargs="+", type=Path)
    tokens.add_argument("--recipe", type=Path, default=None,
                        help="model config YAML (default: the 7B recipe's model settings)")
    tokens.add_argument("--json", action="store_true", help="one JSON object per file")

    args, overrides = parser.parse_known_args(argv)
    if overrides and args.command not in ("train", "tokens"):  # only these take key=value overrides
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    try:
        if args.command == "demo":
            from omniforge.demo import run_demo

            run_demo(args.out, quick=args.quick, seed=args.seed)
        elif args.command == "synth":
            from omniforge.data.synthetic.world import WorldSize, synthesize_world

            synthesize_world(args.out, args.seed, WorldSize.quick() if args.quick else WorldSize())
        elif args.command == "encoders":
            from omniforge.train.encoders import ENCODERS_RECIPE, load_encoder_recipe, pretrain_encoders

            pretrain_encoders(args.world, load_encoder_recipe(args.recipe or ENCODERS_RECIPE), quick=args.quick)
        elif args.command == "eval":
            from omniforge.eval.cli import run as run_eval

            return run_eval(args)
        elif args.command == "train":
            return train_command(args, overrides)
        elif args.command == "tokens":  # key=value words among the files are config overrides
            is_override = [("=" in str(f) and not f.exists()) for f in args.files]  # vision.path=/a/b too
            files = [f for f, o in zip(args.files, is_override) if not o]
            overrides += [str(f) for f, o in zip(args.files, is_override) if o]
            return tokens_command(files, args.recipe, args.json, overrides)
    except OmniforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def rerun_under_tcmalloc() -> None:
    """Start this command again, in this process, with tcmalloc as its allocator: where the system has
    it, unless OMNIFORGE_TCMALLOC=0. A step of a model this small allocates many small tensors, which
    glibc's malloc serves slowly: a training stage runs ~10 % faster under tcmalloc, the audio stand-in's
    pretraining ~20 %, a test-split table ~14 %, with the same losses bit for bit (BENCHMARKS.md,
    session 32). An allocator is chosen before a process starts (LD_PRELOAD); the processes this one
    spawns inherit it."""
    if os.environ.get("OMNIFORGE_TCMALLOC") == "0" or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    library = ctypes.util.find_library(TCMALLOC)
    if library is None:
        return
    preload = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "LD_PRELOAD": preload})


def train_command(args, overrides: list[str]) -> int:
    from omniforge.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides)
    if args.stage:
        recipe.stage(args.stage)  # fails early on an unknown name
    if args.dry_run:
        from omniforge.train.plan import dry_run

        report, missing = dry_run(recipe, world=int(os.environ.get("WORLD_SIZE", "1")))
        print(report)
        if missing:  # the plan is shown all the same: a recipe is often checked before its data is in place
            print(f"error: {len(missing)} data file(s) missing; training would stop on them: {', '.join(missing)}",
                  file=sys.stderr)
            return 2
        return 0
    from omniforge.train.loop import train

    train(recipe, only_stage=args.stage, resume=args.resume)
    return 0


def tokens_command(files: list[Path], recipe: Path | None, as_json: bool, overrides: list[str]) -> int:
    from omniforge.config import load_config
    from omniforge.processing.media import MediaProcessor, media_kind

    config = load_config(recipe or DEFAULT_MODEL, overrides)
    processor = MediaProcessor.from_config(config)
    total, failed = 0, 0
    for file in files:
        try:
            item = processor.item(media_kind(file), file)
        except OmniforgeError as e:  # unreadable, or an unknown kind of file: counted, the rest still listed
            failed += 1
            print(json.dumps({"file": str(file), "error": str(e)}) if as_json else f"{file}: error: {e}")
            continue
        total += item.tokens
        info = item.info
        record = {"file": str(file), "modality": item.modality, "tiles": info.get("tiles", 0),
                  "frames": info.get("frames", 0), "audio_seconds": info.get("seconds", 0.0),
                  "tokens": item.tokens, **info}
        print(json.dumps(record) if as_json else describe(file, item.modality, info, item.tokens))
    if not as_json and len(files) > 1:
        print(f"total: {total} tokens in {len(files) - failed} files" + (f" ({failed} unreadable)" if failed else ""))
    return 1 if failed else 0


def describe(file: Path, modality: str, info: dict, tokens: int) -> str:
    if modality == "image":
        cols, rows = info["grid"]
        thumb = " + thumbnail" if info["thumbnail"] else ""
        what = f"{info['size'][0]}x{info['size'][1]} -> grid {cols}x{rows}{thumb} = {info['tiles']} tiles"
    elif modality == "video":
        times = ", ".join(f"{t:g}" for t in info["timestamps"])
        what = f"{info['duration']:g} s -> {info['frames']} frames at [{times}] s"
    else:
        what = f"{info['seconds']:g} s -> {info['windows']} window(s) of {info['window_seconds']:g} s"
    return f"{file}: {modality} {what} -> {tokens} tokens"


if __name__ == "__main__":
    sys.exit(main())
