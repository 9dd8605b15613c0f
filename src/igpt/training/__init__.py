"""Pretraining: settings, the batch engine, optimizers, the training loop, checkpoints, torchrun."""
