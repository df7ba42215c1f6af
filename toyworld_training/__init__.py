"""Builds the toy world: trains its base model and judge, erases shapes with ESD-x and UCE, and
writes the weights engine/toyworld ships. Depends on the engine, never the reverse."""
