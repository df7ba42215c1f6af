"""The engine's shipped configs: concepts/, models/, runs/ and tune/ YAML files, installed as package data.

The engine finds this folder through importlib.resources (engine.specs.files.config_dirs), so the
configs travel with the wheel; ./configs and $ENGINE_CONFIG_DIR folders are searched first.
"""

# Marks this package as the engine's own, so an unrelated top-level `configs` package is never
# mistaken for the shipped configs.
ENGINE_SHIPPED_CONFIGS = True
