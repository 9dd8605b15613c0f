"""Fine-tuning: the classifier head on a pretrained backbone, its recipe and training loop."""
