"""Judges (CLIP score, ImageNet classifier), the scoring stage's core, selectors, rescoring.

Modules: registry (judge names, requests, preflight), judge (base classes, score slots),
clip_judge, imagenet_judge, scorer (rows -> scored rows), selectors (best-of-N), rescore
(`engine score`). Nothing heavy is imported here, so config validation stays light.
"""
