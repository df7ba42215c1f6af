"""Classifier-guidance recovery on the toy world with a latent classifier trained on rows disjoint
from evaluation, against one trained on the evaluation rows themselves (the engine's earlier
`engine train-classifier` default, which leaked: its positives were the concept's first sampled
prompt/seed rows, the very rows a guidance probe then evaluates, from the same initial noise).

    python benchmarks/classifier_leak.py --output runs/classifier-leak     # ~10 min of CPU, one thread

Both classifiers are trained identically (the original's recipe: 70 epochs, batch 8, 7 noised
copies, AdamW 1e-4) on toy-base images of the 8 toy shapes (positives: circle; negatives: the
other 7 shapes of the toy concept set), --train-images per shape, 25 DDIM steps; only the rows
differ:
- disjoint: each shape's own training seed stream (classifier_training.data.training_rows, what
  `engine train-classifier` uses);
- leaking: each shape's first sampled evaluation rows (ConceptSpec.sample_prompts), so every
  evaluated circle seed is among the positives, and the negatives share those seeds too (every toy
  concept has the same seed list).
Then classifier_guidance runs on toy-esdx-circle for toy_circle, --num-images prompts, every scale
kept as its own row (keep_all_candidates: no selector, no selection bias), judged by the toy judge.
Everything runs in this process, without Ray (the probes, the trainer and the judge are the
engine's own; only the Ray Data plumbing is left out, which changes no image). Prints a markdown
table of judge top-1 % with Wilson 95% intervals.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from classifier_training.data import ImageGroup, cached_group_latents, training_rows
from classifier_training.jobs import train_concept
from classifier_training.train import TrainSettings
from engine.models.builtin import BUILTIN_MODELS
from engine.pipeline.grid import expand_run
from engine.probe import ProbeBatch, ProbeContext, WorkRow, get_probe_class
from engine.scoring.registry import JudgeRequest, build_judge
from engine.specs.concepts import concept_set_members, load_concept
from engine.specs.runs import run_spec_from_dict

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


def generate(pipe, rows_for, shapes, args, folder: Path) -> dict[str, ImageGroup]:
    """toy-base's standard_prompt images of every shape on `rows_for`'s rows, as PNGs."""
    probe = get_probe_class("standard_prompt")()
    params = probe.params_class(num_inference_steps=args.steps)
    context = ProbeContext(torch.device("cpu"), lambda: pipe, load_concept, folder)
    groups = {}
    for shape in shapes:
        concept = load_concept(shape)
        rows = [WorkRow(f"{shape}-{i}", BASE_MODEL, "none", shape, shape, probe.name, "{}", prompt, i, seed)
                for i, prompt, seed in rows_for(concept, args.train_images)]
        out = folder / shape
        out.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(rows), 16):
            chunk = rows[start : start + 16]
            paths = [out / f"{row.prompt_index:03d}_seed{row.seed}.png" for row in chunk]
            if all(path.exists() for path in paths):
                continue  # made by an earlier, interrupted call (the same rows give the same images)
            for path, image in zip(paths, probe.run(ProbeBatch(chunk, params, pipe, context)).images, strict=False):
                Image.fromarray(image).save(path)
        groups[shape] = ImageGroup(f"{BASE_MODEL}:{shape}", str(out), shape, concept.prompt,
                                   tuple(row.seed for row in rows))
    return groups


def train(variant: str, rows_for, pipe, args, work: Path) -> Path:
    """One classifier for CONCEPT from toy-base images of the toy set made on `rows_for`'s rows."""
    shapes = sorted(concept_set_members(load_concept(CONCEPT)))
    groups = generate(pipe, rows_for, shapes, args, work / variant / "images")
    paths = {s: str(cached_group_latents(pipe.vae, g, BASE_MODEL, 32, work / variant)) for s, g in groups.items()}
    output = work / variant / "classifiers"
    summary = train_concept(
        CONCEPT, CONCEPT, [paths[CONCEPT]], [paths[s] for s in shapes if s != CONCEPT],
        [float(a) for a in pipe.scheduler.alphas_cumprod], TrainSettings(epochs=args.epochs).model_dump(),
        str(output), "cpu", {"variant": variant, "positive_seeds": list(groups[CONCEPT].seeds)},
    )
    print(f"{variant}: best epoch {summary['best_epoch']}, val ROC-AUC {summary['roc_auc']:.3f}, "
          f"PR-AUC {summary['pr_auc']:.3f}", flush=True)
    return output


def evaluate(folder: Path, args, work: Path, judge) -> list[dict]:
    """classifier_guidance on ERASED_MODEL, every scale its own row, judged by the toy judge."""
    spec = run_spec_from_dict({
        "output": str(work / "unused"), "models": [ERASED_MODEL], "concepts": [CONCEPT], "judges": [],
        "num_images": args.num_images,
        "probes": [{"name": "classifier_guidance", "params": {
            "num_inference_steps": args.steps, "guidance_scale": 5.0, "classifier_scales": args.scales,
            "keep_all_candidates": True, "initial_noise": "shared", "classifier_dir": str(folder)}}],
    })
    rows = expand_run(spec).rows
    pipe = BUILTIN_MODELS[ERASED_MODEL].build()
    pipe.set_progress_bar_config(disable=True)
    probe = get_probe_class("classifier_guidance")()
    context = ProbeContext(torch.device("cpu"), lambda: None, load_concept, work)
    concept = load_concept(CONCEPT)
    results = []
    for params_json in dict.fromkeys(row.params for row in rows):
        group = [row for row in rows if row.params == params_json]
        params = probe.params_class.model_validate_json(params_json)
        for start in range(0, len(group), 16):
            chunk = group[start : start + 16]
            output = probe.run(ProbeBatch(chunk, params, pipe, context))
            hits = judge.score(output.images, [concept] * len(chunk))["judge_top1"]
            results += [{"seed": row.seed, "scale": extras["classifier_scale"], "hit": bool(hit),
                         "logit": extras["classifier_logit"]}
                        for row, extras, hit in zip(chunk, output.extras, hits, strict=False)]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/classifier-leak"))
    parser.add_argument("--train-images", type=int, default=32, help="Generated training images per shape.")
    parser.add_argument("--num-images", type=int, default=32, help="Evaluated prompts of toy_circle.")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 30.0, 100.0, 193.0])
    parser.add_argument("--epochs", type=int, default=70)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on a shared, loaded machine more threads spin without progress")
    args = parser.parse_args()
    if args.train_images < args.num_images:
        parser.error("--train-images must cover --num-images, so the leaking classifier saw every evaluated row")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = args.output.resolve()
    base = BUILTIN_MODELS[BASE_MODEL].build()
    base.set_progress_bar_config(disable=True)
    folders = {
        "disjoint (each shape's training seed stream)": train("disjoint", training_rows, base, args, work),
        "leaking (the evaluation rows)": train("leaking", lambda c, n: c.sample_prompts(n), base, args, work),
    }
    trained = time.perf_counter()
    judge = build_judge(JudgeRequest(name="toy"), torch.device("cpu"))
    outputs = {label: evaluate(folder, args, work, judge) for label, folder in folders.items()}
    evaluated = {seed for _, _, seed in load_concept(CONCEPT).sample_prompts(args.num_images)}

    print(f"\nclassifier_guidance on {ERASED_MODEL}, concept {CONCEPT}: judge top-1 % [Wilson 95% CI]; "
          f"{args.num_images} prompts, DDIM {args.steps} steps, CFG 5, every scale its own row (no selector)\n")
    headers = [f"s = {s:g}" for s in args.scales] + ["all s > 0", "any s > 0 (oracle)"]
    print("| classifier trained on | evaluated seeds among its positives | " + " | ".join(headers) + " |")
    print("|---|---|" + "---|" * len(headers))
    for label, rows in outputs.items():
        config = json.loads((folders[label] / f"{CONCEPT}.json").read_text())
        overlap = len(evaluated & set(config["data"]["positive_seeds"]))
        by_scale = {s: [r for r in rows if r["scale"] == s] for s in args.scales}
        cells = [cell(sum(r["hit"] for r in by_scale[s]), len(by_scale[s])) for s in args.scales]
        guided = [r for s in args.scales if s > 0 for r in by_scale[s]]
        cells.append(cell(sum(r["hit"] for r in guided), len(guided)))
        any_hit = {r["seed"] for r in guided if r["hit"]}
        cells.append(cell(len(any_hit), len(evaluated)))
        print(f"| {label} | {overlap}/{len(evaluated)} | " + " | ".join(cells) + " |")
    print("\nmean classifier logit of the final latent, per scale:")
    for label, rows in outputs.items():
        means = ", ".join(f"s={s:g}: {np.mean([r['logit'] for r in rows if r['scale'] == s]):.2f}" for s in args.scales)
        print(f"  {label}: {means}")
    print(f"\ntraining {trained - started:.0f} s, evaluation {time.perf_counter() - trained:.0f} s, "
          f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
