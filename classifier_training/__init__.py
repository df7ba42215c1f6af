"""Time-conditioned latent classifiers for classifier guidance: data, training, files.

Depends on `engine`, never the reverse. Modules: model (architecture), data (labels, images,
cached VAE latents), train (the loop), metrics (ROC-AUC, PR-AUC, TPR@FPR), io (safetensors + JSON),
jobs (`engine train-classifier`: Ray tasks, one per concept).
"""
