"""The papers' claims, checked at micro scale on the synthetic world (after `omniforge demo`).

    python bench/ablations.py --demo runs/demo [--steps-scale 0.5] [--seeds 3] [--only a,b,c,d]

Each variant re-runs one stage of `recipes/tiny.yaml` from the demo's export of the stage
before it, then scores the result on the same test samples:

(a) audio alignment with the LLM and vision frozen (the recipe) vs with them trained:
    image-QA accuracy before and after stage 2 (Capybara-OMNI / Freeze-Omni: freezing keeps vision);
(b) 2x2 token pooling vs none: stage 1b with 16 vs 64 tokens a tile, accuracy and training time;
(c) packed vs padded batches: stage 1b with 2048-token rows vs padded batches of the same
    average sample count, accuracy and time;
(d) spoken vs text questions: answer agreement of the demo's final model (VITA's TTS questions).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

import omniforge  # noqa: E402,F401
from omniforge.config import apply_overrides, parse_yaml  # noqa: E402
from omniforge.eval.readers import TaskSpec, load_tasks  # noqa: E402
from omniforge.eval.runner import evaluate  # noqa: E402
from omniforge.model.omni import CONFIG_FILE, OmniModel  # noqa: E402
from omniforge.train.loop import train  # noqa: E402
from omniforge.train.recipe import load_recipe  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
LIMIT = 100


def score(model, world: Path, task: str, out: Path) -> dict:
    tasks = [t for t in load_tasks(TaskSpec("synth", "synth", world / "test"), limit=LIMIT) if t.name.endswith(task)]
    return evaluate(model, tasks, out, batch_size=32, max_new_tokens=32, progress=False)[0].metrics


def run_variant(demo: Path, out: Path, stage: str, overrides: list[str], scale: float) -> tuple[Path, float]:
    """Train `stage` from the demo's previous export with `overrides`; returns (export, seconds).

    A stage that starts from an export takes the model from the export's config, not from the
    recipe's `model:`, so `model.*` overrides are written into the copied export's config.
    """
    model_overrides = [o.removeprefix("model.") for o in overrides if o.startswith("model.")]
    recipe = load_recipe(RECIPE, [f"data_dir={(demo / 'world').resolve()}", f"train.out_dir={out}",
                                  "train.checkpoint_every=0", *overrides])
    names = [s.name for s in recipe.stages]
    previous = names[names.index(stage) - 1]
    shutil.rmtree(out, ignore_errors=True)
    start = out / "stages" / previous
    shutil.copytree(demo / "train" / "stages" / previous, start)
    config = start / CONFIG_FILE
    config.write_text(yaml.safe_dump(apply_overrides(parse_yaml(config.read_text()), model_overrides),
                                     sort_keys=False))
    target = recipe.stage(stage)
    target.steps = max(10, round(target.steps * scale))
    recipe.evals = []
    started = time.perf_counter()
    export = train(recipe, only_stage=stage)
    return export, time.perf_counter() - started


def trained_accuracy(args, name: str, stage: str, overrides: list[str]) -> dict:
    """Test image-QA accuracy of `stage` re-trained once per seed with `overrides`: the mean, each
    seed's figure and the mean training seconds."""
    accuracies, seconds = [], []
    for seed in range(args.seeds):
        out = args.out / (name if args.seeds == 1 else f"{name}_seed{seed}")
        export, took = run_variant(args.demo, out, stage, [*overrides, f"train.seed={seed}"], args.steps_scale)
        accuracies.append(score(OmniModel.from_pretrained(export), args.demo / "world", "image_qa",
                                out.with_name(out.name + "_eval"))["exact_match"])
        seconds.append(took)
    return {"image_qa": sum(accuracies) / len(accuracies), "per_seed": accuracies,
            "seconds": round(sum(seconds) / len(seconds), 1)}


def spread(result: dict) -> str:
    """`51.0%`, or with several seeds `51.0% (49.0-53.0 over 2 seeds)`."""
    seeds = result["per_seed"]
    tail = f" ({min(seeds):.1f}-{max(seeds):.1f} over {len(seeds)} seeds)" if len(seeds) > 1 else ""
    return f"{result['image_qa']:.1f}%{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished `omniforge demo --out` folder")
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--steps-scale", type=float, default=1.0, help="fraction of each stage's steps")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train each variant with train.seed 0..N-1 (the data order) and average")
    parser.add_argument("--only", default="a,b,c,d")
    args = parser.parse_args()
    stages, results = args.demo / "train" / "stages", {}
    only = set(args.only.split(","))
    names = [s.name for s in load_recipe(RECIPE).stages]
    audio, visual = names.index("2_audio_alignment"), names.index("1b_visual_fine_grained")  # for stages.N.* overrides

    if "a" in only:
        before = score(OmniModel.from_pretrained(stages / "1c_high_resolution"), args.demo / "world", "image_qa",
                       args.out / "a_before_eval")
        frozen = trained_accuracy(args, "a_frozen", "2_audio_alignment", [])
        unfrozen = trained_accuracy(args, "a_unfrozen", "2_audio_alignment",
                                    [f"stages.{audio}.components.{part}=full"
                                     for part in ("llm", "vision_tower", "vision_adapter")]
                                    + ["stages.2b_video_directions.beside=null"])  # it trains the LLM too
        results["a"] = {"image_qa_before": before["exact_match"], "frozen": frozen, "unfrozen": unfrozen}
        print(f"(a) image QA before stage 2 {before['exact_match']:.1f}%, after it with LLM+vision frozen "
              f"{spread(frozen)}, with them trained {spread(unfrozen)}")
    trained = {}  # (stage, overrides) -> result: (b)'s 2x2 and (c)'s packed rows are both the recipe's 1b
    for key, name, variants in (("b", "pooling", {"2x2 (16 tokens/tile)": [], "none (64 tokens/tile)": ["model.vision.pool=1"]}),
                                ("c", "packing", {"packed 2048": [], "padded": [f"stages.{visual}.batch_tokens=null",
                                                                                f"stages.{visual}.batch_size=26"]})):
        if key not in only:
            continue
        results[key] = {}
        for label, overrides in variants.items():
            run = ("1b_visual_fine_grained", tuple(overrides))
            if run not in trained:
                trained[run] = trained_accuracy(args, f"{key}_{label.split()[0]}", *run)
            results[key][label] = result = trained[run]
            print(f"({key}) {name}: {label}: image QA {spread(result)} after stage 1b, {result['seconds']:.0f} s")
    if "d" in only:
        report = json.loads((args.demo / "report.json").read_text())
        final = report["stages"][-1]["scores"]
        results["d"] = {"agreement": final.get("consistency", {}).get("consistency"),
                        "spoken_qa": final.get("spoken_qa", {}).get("exact_match"),
                        "text_image_qa": final.get("image_qa", {}).get("exact_match")}
        print("(d) spoken vs text questions: {agreement}% of answers agree; spoken-question accuracy {spoken_qa}%, "
              "text image QA {text_image_qa}%".format(**results["d"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablations.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
