"""The base layer: config files, YAML with line numbers, where each value came from, and the
validated specs (concepts, models, runs, judges) every other layer builds on."""
