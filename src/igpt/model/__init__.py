"""The iGPT transformer, its key/value-cache decoding, torch.compile, and Hugging Face interop."""
