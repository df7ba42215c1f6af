"""Classifier-guidance recovery on the toy world with a latent classifier trained on rows disjoint
from evaluation, against one trained on the evaluation rows themselves (the engine's earlier
`engine train-classifier` default, which leaked: its positives were the concept's first sampled
prompt/seed rows, the very rows a guidance probe then evaluates, from the same initial noise).

    python benchmarks/classifier_leak.py --output runs/classifier-leak      # ~15 min on 2 busy cores

Both classifiers are trained identically (the original's recipe: 70 epochs, batch 8, 7 noised
copies, AdamW 1e-4) on toy-base images of the 8 toy shapes (positives: circle; negatives: the
other 7 shapes of the toy concept set), --train-images per shape, 25 DDIM steps; only the rows
differ:
- disjoint: each shape's own training seed stream (classifier_training.data.training_rows);
- leaking: each shape's first sampled evaluation rows (ConceptSpec.sample_prompts), so the
  evaluated circle seeds are all among the positives, and the negatives share those seeds too
  (every toy concept has the same seed list).
Then classifier_guidance runs on toy-esdx-circle for toy_circle, --num-images prompts, every
scale kept as its own row (keep_all_candidates: no selector, no selection bias), judged by the
toy judge. Prints a markdown table of judge top-1 % with Wilson 95% intervals.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import ray

from classifier_training.data import generate_concept_images, training_rows
from classifier_training.jobs import encode_groups, train_concept
from classifier_training.train import TrainSettings
from engine.concepts import concept_set_members, load_concept
from engine.config import run_spec_from_dict
from engine.models import resolve_model
from engine.pipeline.grid import plan_run
from engine.pipeline.run import execute, ray_session, worker_env
from engine.results import read_rows

CONCEPT = "toy_circle"
ERASED_MODEL = "toy-esdx-circle"
BASE_MODEL = "toy-base"


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def cell(hits: int, n: int) -> str:
    low, high = wilson(hits, n)
    return f"{100 * hits / n:.0f} [{100 * low:.0f}, {100 * high:.0f}] (n={n})"


def train(variant: str, rows_for, args, work: Path) -> Path:
    """One classifier for CONCEPT from toy-base images of the toy set made on `rows_for`'s rows."""
    shapes = sorted(concept_set_members(load_concept(CONCEPT)))
    groups = generate_concept_images(BASE_MODEL, shapes, args.train_images, args.steps, work / variant / "work",
                                     rows_for=rows_for)
    model = resolve_model(BASE_MODEL)
    encoded = encode_groups(model.model_dump(mode="json"), list(groups.values()), None, str(work / variant / "work"),
                            "cpu")
    output = work / variant / "classifiers"
    summary = train_concept(
        CONCEPT, CONCEPT, [encoded["paths"][groups[CONCEPT].name]],
        [encoded["paths"][groups[s].name] for s in shapes if s != CONCEPT], encoded["alphas_cumprod"],
        TrainSettings(epochs=args.epochs).model_dump(), str(output), "cpu",
        {"model": model.model_dump(mode="json"), "variant": variant,
         "positive_seeds": list(groups[CONCEPT].seeds)},
    )
    print(f"{variant}: best epoch {summary['best_epoch']}, val ROC-AUC {summary['roc_auc']:.3f}, "
          f"PR-AUC {summary['pr_auc']:.3f}", flush=True)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/classifier-leak"))
    parser.add_argument("--train-images", type=int, default=40, help="Generated training images per shape.")
    parser.add_argument("--num-images", type=int, default=32, help="Evaluated prompts of toy_circle.")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 30.0, 100.0, 193.0])
    parser.add_argument("--epochs", type=int, default=70)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    if args.train_images < args.num_images:
        parser.error("--train-images must cover --num-images, so the leaking classifier saw every evaluated row")
    started = time.perf_counter()
    work = args.output.resolve()
    # A Ray of our own (address="local"): on a shared machine a bare ray.init() joins whatever
    # cluster another user started with `ray start`; the engine's functions reuse this session.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env()})
    with ray_session(None):
        folders = {
            "disjoint (each shape's training seed stream)": train("disjoint", training_rows, args, work),
            "leaking (the evaluation rows)": train("leaking", lambda c, n: c.sample_prompts(n), args, work),
        }
        trained = time.perf_counter()
        common = {"num_inference_steps": args.steps, "guidance_scale": 5.0, "classifier_scales": args.scales,
                  "keep_all_candidates": True, "initial_noise": "shared"}
        outputs = {}
        for index, (label, folder) in enumerate(folders.items()):
            spec = run_spec_from_dict({
                "output": str(work / f"eval-{index}"), "models": [ERASED_MODEL], "base_model": BASE_MODEL,
                "concepts": [CONCEPT], "num_images": args.num_images, "judges": ["toy"], "torch_threads": 1,
                "probes": [{"name": "classifier_guidance", "params": {**common, "classifier_dir": str(folder)}}],
            })
            execute(plan_run(spec))
            outputs[label] = read_rows(work / f"eval-{index}", columns=["seed", "extras", "judge_top1"]).to_pylist()
    ray.shutdown()
    evaluated = {seed for _, _, seed in load_concept(CONCEPT).sample_prompts(args.num_images)}

    print(f"\nclassifier_guidance on {ERASED_MODEL}, concept {CONCEPT}: judge top-1 % [Wilson 95% CI]; "
          f"{args.num_images} prompts, DDIM {args.steps} steps, CFG 5, every scale its own row (no selector)\n")
    headers = [f"s = {s:g}" for s in args.scales] + ["all s > 0", "any s > 0 (oracle)"]
    print("| classifier trained on | evaluated seeds among its positives | " + " | ".join(headers) + " |")
    print("|---|---|" + "---|" * len(headers))
    for label, rows in outputs.items():
        config = json.loads((folders[label] / f"{CONCEPT}.json").read_text())
        overlap = len(evaluated & set(config["data"]["positive_seeds"]))
        by_scale = {s: [r for r in rows if json.loads(r["extras"])["classifier_scale"] == s] for s in args.scales}
        cells = [cell(sum(r["judge_top1"] for r in by_scale[s]), len(by_scale[s])) for s in args.scales]
        guided = [r for s in args.scales if s > 0 for r in by_scale[s]]
        cells.append(cell(sum(r["judge_top1"] for r in guided), len(guided)))
        any_hit = {seed for seed in evaluated if any(r["judge_top1"] for r in guided if r["seed"] == seed)}
        cells.append(cell(len(any_hit), len(evaluated)))
        print(f"| {label} | {overlap}/{len(evaluated)} | " + " | ".join(cells) + " |")
    print(f"\ntraining {trained - started:.0f} s, evaluation {time.perf_counter() - trained:.0f} s, "
          f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
