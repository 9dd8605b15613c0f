"""The iGPT transformer, the table of pretraining objectives, key/value-cache decoding and torch.compile."""
