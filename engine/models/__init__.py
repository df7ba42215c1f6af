"""Models: resolving a user's reference (resolve), loading pipelines (loading), the per-actor cache
(cache), built-in models (builtin), model families (families) and GPU speed settings (acceleration)."""
