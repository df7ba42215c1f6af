"""The scoring stage: `engine run` writes scored rows through Ray; best-of-N candidates and
selectors (ProbeRunner + ScoreActor in-process); `engine score` changes scores and nothing else."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import Field
from typer.testing import CliRunner

from engine.cli import app
from engine.errors import UserError
from engine.pipeline.grid import expand_run
from engine.pipeline.stages import ProbeRunner, ProbeStageConfig, ScoreActor, ScoreStageConfig
from engine.probe import PROBE_REGISTRY, Probe, ProbeBatch, ProbeOutput, ProbeParams
from engine.results import CANDIDATE_IMAGES, ROW_SCHEMA, STREAM_SCHEMA, decode_png, read_rows, rows_table
from engine.scoring.registry import build_judge, parse_judge_ref
from engine.scoring.rescore import rescore_run
from engine.scoring.scorer import Scorer, crop_to_region
from engine.scoring.selectors import SelectorName, check_selectors
from engine.specs.concepts import load_concept
from engine.specs.runs import run_spec_from_dict

runner = CliRunner()
TINY_JUDGES = "judges=[clip:tiny, imagenet:tiny]"
SCORE_COLUMNS = {"clip_score", "clip_model", "scoring_seconds"}
REGION = (8, 8, 56, 56)


def _run_args(output, *extra):
    return ["run", "--model", "tiny", "--concept", "church", "--concept", "van_gogh", "--probe", "standard_prompt",
            "--num-images", "2", "--output", str(output), "--probe-param", "standard_prompt.num_inference_steps=2",
            "--set", TINY_JUDGES, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, ray_session):
    output = tmp_path_factory.mktemp("scored") / "run"
    result = runner.invoke(app, _run_args(output))
    assert result.exit_code == 0, result.output
    return output


def _by_row_id(output) -> dict[str, dict]:
    return {r["row_id"]: r for r in read_rows(output).to_pylist()}


def test_run_writes_rows_scored_by_named_judges(scored_run):
    rows = list(_by_row_id(scored_run).values())
    assert len(rows) == 4
    for path in (scored_run / "rows").glob("*.parquet"):
        assert pq.read_schema(path).names == ROW_SCHEMA.names  # the transient candidate column is gone
    for row in rows:
        assert isinstance(row["clip_score"], float) and -100 <= row["clip_score"] <= 100
        assert row["clip_model"] == "clip:tiny-clip/random-seed0"
        assert row["judge_model"] == "imagenet:tiny/random-seed0"
        assert row["scoring_seconds"] > 0 and row["selector"] is None and row["candidate_count"] is None
        if row["concept"] == "church":
            assert isinstance(row["judge_top1"], bool) and isinstance(row["judge_top5"], bool)
            assert 0.0 < row["judge_target_prob"] < 1.0
        else:  # a style: no ImageNet class, so null verdicts, not misses
            assert row["judge_top1"] is None and row["judge_top5"] is None and row["judge_target_prob"] is None


def test_stream_scores_equal_scoring_the_stored_images_again(scored_run):
    concepts = {name: load_concept(name) for name in ("church", "van_gogh")}
    requests = [parse_judge_ref("clip:tiny"), parse_judge_ref("imagenet:tiny")]
    table = read_rows(scored_run)
    again = Scorer.from_requests(requests, concepts, torch.device("cpu"), 8).score_table(table).to_pylist()
    for stored, fresh in zip(table.to_pylist(), again, strict=False):
        assert fresh["clip_score"] == pytest.approx(stored["clip_score"], abs=1e-4)
        assert fresh["judge_top5"] == stored["judge_top5"] and fresh["judge_top1"] == stored["judge_top1"]


def test_engine_score_replaces_scores_and_nothing_else(scored_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(scored_run, copy)
    files_before = sorted(p.name for p in (copy / "rows").iterdir())
    result = runner.invoke(app, ["score", str(copy), "--judge", "clip:tiny", "--judge-option", "clip.seed=1"])
    assert result.exit_code == 0, result.output
    assert "scored 4 rows" in result.output and "clip:tiny-clip/random-seed1" in result.output
    assert sorted(p.name for p in (copy / "rows").iterdir()) == files_before  # in place, no leftovers
    before, after = _by_row_id(scored_run), _by_row_id(copy)
    assert before.keys() == after.keys()
    for row_id, old in before.items():
        new = after[row_id]
        assert {k: v for k, v in new.items() if k not in SCORE_COLUMNS} == {
            k: v for k, v in old.items() if k not in SCORE_COLUMNS
        }  # identity, image, classifier verdicts: byte for byte the same
        assert new["clip_model"] == "clip:tiny-clip/random-seed1" and new["clip_score"] != old["clip_score"]
    history = json.loads((copy / "manifest.json").read_text())["scoring_history"]
    assert history[-1]["judges"] == ["clip:tiny-clip/random-seed1"] and history[-1]["rows"] == 4


def test_engine_report_on_a_run(scored_run, tmp_path):
    result = runner.invoke(app, ["report", str(scored_run), "--output", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "report of 4 rows in 2 cells" in result.output
    html = (tmp_path / "report" / "report.html").read_text()
    assert "clip:tiny-clip/random-seed0" in html and html.count("data:image/png;base64,") == 3 + 2


@pytest.mark.parametrize("args, expected", [
    (["score", "{run}", "--judge", "clipp"], "'clipp' (did you mean 'clip'?); valid choices: clip, imagenet"),
    (["score", "{run}", "--judge", "clip:tiny", "--judge-option", "clip.modle=x"], "unknown key 'modle'"),
    (["score", "{run}", "--judge", "clip:tiny", "--judge-option", "imagenet.seed=1"], "not given with --judge"),
    (["score", "{run}", "--judge", "clip:tiny", "--judge-option", "seed=1"], "expects JUDGE.KEY=VALUE"),
    (["score", "{tmp}", "--judge", "clip:tiny"], "holds no result rows"),
    (["score", "{tmp}/none", "--judge", "clip:tiny"], "run folder not found"),
])  # fmt: skip
def test_score_bad_input_exits_2_with_one_line(scored_run, tmp_path, args, expected):
    result = runner.invoke(app, [a.format(run=scored_run, tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output


# --------------------------------------------------------------------------- best-of-N, in-process


class BestOfThreeParams(ProbeParams):
    selector: SelectorName = Field("clip", description="Which model picks the kept candidate.")


class BestOfThreeProbe(Probe):
    """A best-of-N probe without diffusion: three seeded noise images per row, scored in a region."""

    name = "best_of_three"
    params_class = BestOfThreeParams
    sampler = "pipeline"
    role = "recovery"
    needs_base_reference = False
    best_of_n = False
    base_reference = False
    baseline = False

    def run(self, batch: ProbeBatch) -> ProbeOutput:
        images, extras, candidates = [], [], []
        for row in batch.rows:
            options = [np.random.RandomState(row.seed * 10 + k).randint(0, 256, (64, 64, 3), np.uint8)
                       for k in range(3)]  # fmt: skip
            scores = batch.context.selector_scores(batch.params.selector, options, row.target_concept, [REGION] * 3)
            chosen = int(np.argmax(scores))
            images.append(options[chosen])
            candidates.append(options)
            extras.append({"selected_candidate": chosen, "selector_score": scores[chosen]})
        return ProbeOutput(images=images, extras=extras, scoring_regions=[REGION] * len(images), candidates=candidates)


@pytest.fixture
def best_of_three(monkeypatch):
    monkeypatch.setitem(PROBE_REGISTRY, "best_of_three", f"{__name__}:BestOfThreeProbe")


def _plan(tmp_path, selector: str, judges: list[str] = ("clip:tiny", "imagenet:tiny"), concepts=("church",)):
    spec = run_spec_from_dict({
        "output": str(tmp_path / "out"), "models": ["tiny"], "concepts": list(concepts), "num_images": 2,
        "probes": [{"name": "best_of_three", "params": {"selector": selector}}], "judges": list(judges),
    })  # fmt: skip
    return expand_run(spec)


def _generate(grid, tmp_path) -> list[dict]:
    probe_runner = ProbeRunner(ProbeStageConfig.from_grid(grid, "cpu", "sdpa", 1, str(tmp_path / "cache")))
    outcome = probe_runner.generate(grid.rows)
    assert not outcome.failures, outcome.failures
    return outcome.records


def test_best_of_n_rows_record_selector_and_candidate_means(best_of_three, tmp_path):
    grid = _plan(tmp_path, "clip")
    records = _generate(grid, tmp_path)
    assert [r["selector"] for r in records] == ["clip=clip:tiny-clip/random-seed0"] * 2
    assert [r["candidate_count"] for r in records] == [3, 3]
    scored = ScoreActor(ScoreStageConfig.from_grid(grid, "cpu", 1))(rows_table(records, STREAM_SCHEMA))
    assert scored.schema == ROW_SCHEMA and CANDIDATE_IMAGES not in scored.column_names

    church = load_concept("church")
    clip = build_judge(parse_judge_ref("clip:tiny"), torch.device("cpu"))
    imagenet = build_judge(parse_judge_ref("imagenet:tiny"), torch.device("cpu"))
    for record, row in zip(records, scored.to_pylist(), strict=False):
        options = [crop_to_region(decode_png(png), REGION) for png in record[CANDIDATE_IMAGES]]
        clip_scores = clip.concept_scores(options, church)
        verdicts = imagenet.score(options, [church] * 3)
        assert row["candidate_clip_mean"] == pytest.approx(np.mean(clip_scores), abs=1e-4)
        assert row["candidate_top1_rate"] == pytest.approx(np.mean(verdicts["judge_top1"]))
        assert row["candidate_top5_rate"] == pytest.approx(np.mean(verdicts["judge_top5"]))
        assert row["candidate_hits"] == verdicts["judge_top1"]  # every candidate's hit, in candidate order
        kept = json.loads(row["extras"])["selected_candidate"]
        assert row["judge_top1"] == verdicts["judge_top1"][kept]
        assert row["judge_top5_classes"] == verdicts["judge_top5_classes"][kept]
        assert len(row["judge_top5_probs"]) == 5 and row["judge_top5_probs"] == sorted(row["judge_top5_probs"],
                                                                                     reverse=True)
        # The clip selector kept the candidate the same CLIP scores highest, judged in the same region.
        assert row["clip_score"] == pytest.approx(max(clip_scores), abs=1e-4)
        assert json.loads(row["extras"])["selected_candidate"] == int(np.argmax(clip_scores))
        assert row["scoring_region"] == list(REGION)

    # A rescore cannot see the candidates (their images are not stored): it clears the rescored
    # judge's candidate means rather than leave numbers from another judge, and keeps the others.
    (tmp_path / "run" / "rows").mkdir(parents=True)
    pq.write_table(scored, tmp_path / "run" / "rows" / "part.parquet")
    rescore_run(tmp_path / "run", ["clip:tiny"], "cpu")
    for old, new in zip(scored.to_pylist(), read_rows(tmp_path / "run").to_pylist(), strict=False):
        assert new["candidate_clip_mean"] is None and new["candidate_count"] == 3
        assert new["candidate_top1_rate"] == old["candidate_top1_rate"]
        assert new["candidate_hits"] == old["candidate_hits"]  # the classifier judge's: kept
        assert new["clip_score"] == pytest.approx(old["clip_score"], abs=1e-4)
    rescore_run(tmp_path / "run", ["imagenet:tiny"], "cpu")  # the hits' own judge: cleared, not kept stale
    for new in read_rows(tmp_path / "run").to_pylist():
        assert new["candidate_hits"] is None and new["candidate_top1_rate"] is None
        assert new["judge_top1"] is not None and len(new["judge_top5_classes"]) == 5


def test_judge_selector_falls_back_to_clip_per_concept_on_a_run_mixing_objects_and_styles(best_of_three, tmp_path):
    grid = _plan(tmp_path, "judge", concepts=("church", "van_gogh"))
    check_selectors([BestOfThreeParams(selector="judge")], [parse_judge_ref(j) for j in ("clip:tiny", "imagenet:tiny")],
                    {c: load_concept(c) for c in ("church", "van_gogh")})  # accepted: van_gogh falls back
    records = _generate(grid, tmp_path)
    by_concept = {r["concept"]: r["selector"] for r in records}
    assert by_concept == {"church": "judge=imagenet:tiny/random-seed0",
                          "van_gogh": "judge->clip=clip:tiny-clip/random-seed0"}
    clip = build_judge(parse_judge_ref("clip:tiny"), torch.device("cpu"))
    for record in (r for r in records if r["concept"] == "van_gogh"):
        options = [crop_to_region(decode_png(png), REGION) for png in record[CANDIDATE_IMAGES]]
        scores = clip.concept_scores(options, load_concept("van_gogh"))
        assert json.loads(record["extras"])["selected_candidate"] == int(np.argmax(scores))
    scored = ScoreActor(ScoreStageConfig.from_grid(grid, "cpu", 1))(rows_table(records, STREAM_SCHEMA)).to_pylist()
    styles = [r for r in scored if r["concept"] == "van_gogh"]
    assert all(r["candidate_hits"] is None and r["judge_top5_classes"] is None for r in styles)  # no classes: null


def test_selector_none_keeps_the_first_candidate(best_of_three, tmp_path):
    records = _generate(_plan(tmp_path, "none"), tmp_path)
    assert [r["selector"] for r in records] == ["none", "none"]
    assert [json.loads(r["extras"])["selected_candidate"] for r in records] == [0, 0]


def test_latent_classifier_selector_needs_a_classifier_in_the_actor_too(best_of_three, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./classifiers (the default folder) does not exist here
    grid = _plan(tmp_path, "latent_classifier")
    with pytest.raises(UserError, match='no classifier for church in classifiers; train one with: engine train-clas'):
        _generate(grid, tmp_path)


@pytest.mark.parametrize("selector, judges, concepts, expected", [
    ("judge", ["clip:tiny"], ["church"], "uses the run's classifier judge, but the run has none"),
    ("clip", ["imagenet:tiny"], ["church"], "uses the run's clip judge, but the run has none"),
    ("judge", ["imagenet:tiny"], ["church", "van_gogh"], "van_gogh have none, and the run has no clip judge"),
    ("latent_classifier", ["clip:tiny"], ["church"], "no classifier for church"),
])  # fmt: skip
def test_selector_needs_checked_before_work(selector, judges, concepts, expected):
    requests = [parse_judge_ref(j) for j in judges]
    with pytest.raises(UserError, match=expected):
        check_selectors([BestOfThreeParams(selector=selector)], requests, {c: load_concept(c) for c in concepts})


@pytest.mark.parametrize("extra, expected", [
    (["--probe-param", "best_of_three.selector=bogus"], "selector"),
    (["--probe-param", "best_of_three.selector=latent_classifier"], "no classifier for church"),
    (["--probe-param", "best_of_three.selector=judge", "--set", "judges=[clip:tiny]"], "classifier judge"),
    (["--set", "judges=[clipp]"], "unknown judge 'clipp'"),
    (["--set", "judges=[clip:tiny, clip]"], "both write the clip score columns"),
])  # fmt: skip
def test_run_bad_judge_or_selector_exits_2_before_ray(best_of_three, tmp_path, extra, expected):
    args = ["run", "--model", "tiny", "--concept", "church", "--probe", "best_of_three", "--num-images", "1",
            "--output", str(tmp_path / "out"), "--set", TINY_JUDGES, *extra]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert not (tmp_path / "out").exists()  # nothing started
