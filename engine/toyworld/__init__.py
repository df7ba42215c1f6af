"""The toy world: a tiny Stable-Diffusion-style model trained from scratch on procedurally drawn
shapes, a judge for those shapes, and erased variants made by our own ESD-x, so that erasure and
recovery can be measured on a CPU with no downloaded weights (issue 7).

Modules, one job each: render (images and captions), tokenizer (CLIP tokenizer built in code),
models (component configs), judge (shape classifier), train (VAE and diffusion training), erase
(ESD-x / UCE on any diffusers UNet), build (the `engine toyworld build` orchestration), shipped
(loading the committed weights as built-in models).
"""
