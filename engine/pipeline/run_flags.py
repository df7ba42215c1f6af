"""`engine run`'s flags merged into a run spec: the flags a run file can also say (concepts, probes,
output...) override its keys, and every key records where it came from (file line, flag, `--set`)
so a validation error names it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.models.families import model_families
from engine.models.resolve import expand_model_refs, resolve_model, unet_override_spec
from engine.probe import get_probe_class
from engine.specs.base import validate
from engine.specs.flags import parse_owner_key_values
from engine.specs.runs import ModelSpec, RunSpec, apply_overrides, run_spec_from_dict
from engine.specs.sources import Sources
from engine.specs.yaml_reader import read_yaml_with_sources


@dataclass(frozen=True)
class RunFlags:
    """The command line of `engine run` (empty lists and None: not given)."""

    model: list[str] = field(default_factory=list)
    concept: list[str] = field(default_factory=list)
    probe: list[str] = field(default_factory=list)
    num_images: int | None = None
    output: str | None = None
    shared_output: bool = False
    base_model: str | None = None
    unet: Path | None = None
    method: str | None = None
    erased: list[str] = field(default_factory=list)
    probe_param: list[str] = field(default_factory=list)
    set_: list[str] = field(default_factory=list)
    batch_size: int | None = None
    allow_pickle: bool = False
    classifier_dir: Path | None = None
    no_space_check: bool = False
    track: list[str] = field(default_factory=list)


def run_spec_from_flags(config: Path | None, flags: RunFlags) -> tuple[RunSpec, Sources]:
    """The run spec of a run file (or none) with the flags applied, and where each key came from."""
    # `sources` records where each key came from (file line, flag, --set), so errors name it.
    data, sources = read_yaml_with_sources(config) if config else ({}, Sources("run flags"))
    if config and (flags.model or flags.concept or flags.probe):
        raise UserError("give either a run file or --model/--concept/--probe flags, not both")
    labels = _labels(flags.method, flags.erased)
    if labels and not (flags.model or flags.unet):
        raise UserError("--method and --erased label the --model or --unet models; give one (a run file's models "
                        "say theirs in configs/models)")
    if flags.concept:
        data["concepts"] = list(flags.concept)
        sources.record("concepts", "--concept")
    elif flags.erased and not config:
        data["concepts"] = list(flags.erased)
        sources.record("concepts", "--erased")
    if flags.probe:
        data["probes"] = list(flags.probe)
        sources.record("probes", "--probe")
    for key, value in [("output", flags.output), ("num_images", flags.num_images), ("base_model", flags.base_model),
                         ("batch_size", flags.batch_size)]:
        if value is not None:
            data[key] = str(value) if isinstance(value, Path) else value
            sources.record(key, "--" + key.replace("_", "-"))
    if flags.model:
        data["models"] = [_labelled(m, labels) for m in flags.model] if labels else list(flags.model)
        sources.record("models", "--model")
    if flags.allow_pickle and isinstance(data.get("models"), list):
        # Mappings stay mappings, so the run spec's validation still names the file line of a bad key.
        data["models"] = [{**m, "allow_pickle": True} if isinstance(m, dict)
                          else _labelled(m, {"allow_pickle": True}) if isinstance(m, (str, ModelSpec)) else m
                          for m in expand_model_refs(data["models"])]
    overrides = parse_owner_key_values(flags.probe_param, "--probe-param", "PROBE")
    if overrides:
        data["probes"] = _merge_probe_params(data.get("probes", []), overrides, flags.probe_param, sources)
    if flags.classifier_dir is not None:
        data["probes"] = _with_classifier_dir(data.get("probes", []), str(flags.classifier_dir), sources)
    if flags.shared_output:
        data["shared_output"] = True
        sources.record("shared_output", "--shared-output")
    if flags.no_space_check:
        data["space_check"] = False
        sources.record("space_check", "--no-space-check")
    if flags.track:
        data["tracking"] = list(flags.track)
        sources.record("tracking", "--track")
    for required, flag in [("output", "--output"), ("num_images", "--num-images"), ("concepts", "--concept"),
                           ("probes", "--probe")]:
        if required not in data and not config:
            raise UserError(f"missing {flag}")
    return run_spec_from_dict(apply_overrides(data, flags.set_, sources), sources), sources


def unet_override_models(spec: RunSpec, flags: RunFlags) -> list[ModelSpec]:
    """`--unet PATH`: the erased UNet on the run's base model, as one more model of the run."""
    if flags.unet is None:
        return []
    override = unet_override_spec(str(flags.unet), spec.base_model, flags.method, flags.erased)
    return [override.model_copy(update={"allow_pickle": flags.allow_pickle})]


def _labels(method: str | None, erased: list[str]) -> dict[str, Any]:
    labels: dict[str, Any] = {}
    if method is not None:
        labels["method"] = method
    if erased:
        labels["erased"] = list(erased)
    return labels


def _labelled(ref, labels: dict[str, Any]) -> dict[str, Any]:
    """A model reference (name, spec or spec mapping) with `labels` applied (they replace its own)."""

    if isinstance(ref, str) and ref in model_families():
        raise UserError(f"--method/--erased cannot label {ref!r}: it is a family, whose members label themselves")
    spec = resolve_model(validate(ModelSpec, ref, "model entry") if isinstance(ref, dict) else ref,
                         check_source=False)
    return validate(ModelSpec, {**spec.model_dump(mode="json"), **labels}, "model flags").model_dump(mode="json")


def _probe_entries(probes: Any) -> list[tuple[int, dict[str, Any]]]:
    """(index, entry as a dict) of each well-formed probe entry (a name, or a mapping with a string
    name and mapping params); malformed ones are left to the run spec's validation to report."""
    if not isinstance(probes, list):
        return []
    entries = []
    for index, entry in enumerate(probes):
        if isinstance(entry, str):
            entries.append((index, {"name": entry}))
        elif (isinstance(entry, dict) and isinstance(entry.get("name"), str)
              and isinstance(entry.get("params", {}), dict)):
            entries.append((index, dict(entry)))
    return entries


def _merge_probe_params(probes: Any, overrides: dict[str, dict[str, Any]], flags: list[str], sources) -> Any:
    entries = _probe_entries(probes)
    names = [entry["name"] for _, entry in entries]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UserError(f"--probe-param names probe {unknown[0]!r}, which is not in this run ({', '.join(names)})")
    merged = list(probes)
    for index, entry in entries:
        if entry["name"] in overrides:
            entry["params"] = {**entry.get("params", {}), **overrides[entry["name"]]}
            merged[index] = entry
            for key in overrides[entry["name"]]:
                flag = next(f for f in reversed(flags) if f.partition("=")[0] == f"{entry['name']}.{key}")
                sources.record(("probes", index, "params", key), f"--probe-param {flag}")
    return merged


def _with_classifier_dir(probes: Any, classifier_dir: str, sources) -> Any:
    """--classifier-dir: the classifier_dir param of every probe that has one, unless set already."""

    updated, used = list(probes) if isinstance(probes, list) else probes, False
    for index, entry in _probe_entries(probes):
        try:
            fields = get_probe_class(entry["name"]).params_class.model_fields
        except UserError as error:
            raise UserError(f"{sources.of(('probes', index))}: {error}") from None
        if "classifier_dir" in fields:
            if "classifier_dir" not in entry.get("params", {}):
                sources.record(("probes", index, "params", "classifier_dir"), "--classifier-dir")
            entry["params"] = {"classifier_dir": classifier_dir, **entry.get("params", {})}
            updated[index] = entry
            used = True
    if not used:
        raise UserError("--classifier-dir: no probe of this run uses latent classifiers")
    return updated


