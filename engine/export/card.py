"""The dataset card of an export: README.md with YAML metadata, generated from the run's manifest
and the exported rows.

The YAML header holds what the hub reads (`configs` pointing `datasets` at data/*.parquet,
`pretty_name`, `tags`, `size_categories`) and, under `erasure_probe_engine`, what the run was: the
engine version and commit, the command, the models with their methods, the concepts, probes,
judges and the row counts by role. The body says the same in prose and tables, and how to load it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from engine.metrics.columns import MODEL_COLUMNS

CARD_COLUMNS = ["model", "method", "concept", "probe", "role", *MODEL_COLUMNS.values()]


def size_category(rows: int) -> str:
    """The hub's size_categories bucket."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if rows < limit:
            return label
    return "1M<n<10M"


def card_facts(manifest: dict[str, Any], data: Path) -> dict[str, Any]:
    """What the card says, read from the manifest and the exported files' projected columns."""
    models: dict[str, str] = {}
    concepts: Counter[str] = Counter()
    probes: Counter[str] = Counter()
    roles: Counter[str] = Counter()
    judges: set[str] = set()
    rows = 0
    for path in sorted(data.glob("*.parquet")):
        available = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in CARD_COLUMNS if c in available]).to_pydict()
        rows += len(table["model"])
        models.update(zip(table["model"], table["method"], strict=True))
        concepts.update(table["concept"])
        probes.update(table["probe"])
        roles.update(r or "unpaired" for r in table.get("role", [None] * len(table["model"])))
        judges.update(j for c in MODEL_COLUMNS.values() for j in table.get(c, []) if j)
    return {
        "engine_version": manifest.get("engine_version"),
        "git_commit": manifest.get("git_commit"),
        "command": manifest.get("command_line"),
        "status": manifest.get("status"),
        "finished_at": manifest.get("finished_at"),
        "rows": rows,
        "rows_by_role": dict(sorted(roles.items())),
        "models": [{"name": name, "method": method} for name, method in sorted(models.items())],
        "concepts": sorted(concepts),
        "probes": sorted(probes),
        "judges": sorted(judges),
        "failed_rows": (manifest.get("counts") or {}).get("failed"),
    }


def render_card(manifest: dict[str, Any], data: Path) -> str:
    facts = card_facts(manifest, data)
    header = {
        "pretty_name": "Erasure probe results",
        "tags": ["concept-erasure", "diffusion", "text-to-image", "erasure-probe-engine"],
        "size_categories": [size_category(facts["rows"])],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
        "erasure_probe_engine": facts,
    }
    models = "\n".join(f"| {m['name']} | {m['method']} |" for m in facts["models"])
    return (
        "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n\n"
        "# Erasure probe results\n\n"
        "Images of text-to-image models that were trained to erase concepts, made by the erasure probe "
        "engine's probes (ways of bringing an erased concept back), one row per image with its judges' "
        "scores.\n\n"
        f"- rows: {facts['rows']} ({', '.join(f'{k} {v}' for k, v in facts['rows_by_role'].items())})\n"
        f"- concepts: {', '.join(facts['concepts'])}\n"
        f"- probes: {', '.join(facts['probes'])}\n"
        f"- judges: {', '.join(facts['judges']) or 'none (unscored)'}\n"
        f"- engine {facts['engine_version']} (commit {facts['git_commit']}), command: `{facts['command']}`\n\n"
        "| model | erasure method |\n|---|---|\n" + models + "\n\n"
        "```python\nimport datasets\n"
        'rows = datasets.load_dataset("parquet", data_dir="THIS_FOLDER", split="train")\n'
        'rows[0]["image"]  # a PIL image\n```\n\n'
        "Columns: `row_id` (content hash of the row's identity), `model`, `method`, `concept`, "
        "`target_concept`, `probe`, `params` (JSON), `prompt`, `seed`, `role` (recovery, preservation, "
        "base, unpaired), `image`, and the judges' scores (`clip_score`, `judge_top1`, `judge_top5`, "
        "`judge_target_prob`, `judge_top5_classes`, ...) with the judge that gave them (`clip_model`, "
        "`judge_model`).\n"
    )


def write_card(path: Path, manifest: dict[str, Any], data: Path) -> None:
    path.write_text(render_card(manifest, data), encoding="utf-8")
