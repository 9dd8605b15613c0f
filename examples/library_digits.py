"""igpt as a library, notebook style: prepare -> pretrain -> probe -> finetune -> sample on scikit-learn's 8x8
digits, through `igpt.*` calls only (no command line). A minute or two on a laptop CPU.

Run:  .venv/bin/python examples/library_digits.py [OUT_DIR]    (default runs/library-digits)
"""

import sys
from pathlib import Path

import igpt

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/library-digits")

meta = igpt.prepare("digits", out / "data", resolution=8, clusters=8)
print(f"prepared: {meta['n_train']} train / {meta['n_test']} test images, {meta['clusters']} grey levels")

summary = igpt.pretrain(
    data=out / "data", out=out / "run", preset="micro", steps=300, batch_size=32, progress=False, resume=True
)
print(f"pretrained: {summary['steps']} steps, val_nll {summary['val_nll']:.4f} nats/token")

probe = igpt.probe(out / "run", progress=False)
layers = ", ".join(f"{k}: {v:.3f}" for k, v in probe["layers"].items())
print(f"probe by layer ({layers}); best layer {probe['best_layer']} (chosen on validation)")
print(f"  best {probe['best_accuracy']:.3f} against raw pixels {probe['raw_pixel_accuracy']:.3f}")

if not (out / "ft").exists():
    ft = igpt.finetune(out / "run", out=out / "ft", epochs=2, progress=False)
    print(f"fine-tuned: test accuracy {ft['test_accuracy']:.3f} (best epoch {ft['best_epoch']})")

grid = igpt.sample(out / "run", out=out / "completions.png", num=4, count=4)
print(f"sampled: {grid['png']}, {grid['new_tokens']} tokens at {grid['tokens_per_second']:,.0f} tokens/s")

model = igpt.load_run(out / "ft")  # a fine-tuned run opens like any other: its backbone
c = model.config
print(f"fine-tuned backbone: {c.n_layer} layers x {c.n_embd}, {model.num_params():,} parameters")
