"""Hugging Face ImageGPT parity: random tiny configurations, both directions, against transformers."""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTForImageClassification,
    ImageGPTModel,
)

import igpt  # noqa: E402
from igpt.cli import main  # noqa: E402
from igpt.model.gpt import IGPT, IGPTConfig  # noqa: E402

CONFIGS = [  # (K, res, width, layers, heads)
    (16, 4, 32, 2, 2),
    (9, 5, 48, 3, 4),
    (32, 3, 24, 1, 3),
]


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within `rel` of the reference's largest magnitude (fp32 sums differ in their last bits)."""
    assert a.shape == b.shape
    a, b = a.detach(), b.detach()
    err, scale = float((a - b).abs().max()), float(b.abs().max())
    assert err <= rel * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def hf_random(K, res, d, L, h, seed=0):
    torch.manual_seed(seed)
    cfg = ImageGPTConfig(
        vocab_size=K + 1,
        n_positions=res * res,
        n_embd=d,
        n_layer=L,
        n_head=h,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    m = ImageGPTForCausalImageModeling(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(0, 0.3 if "ln" not in name else 1.0)  # nonzero biases, gains and head
    return m


def save_hf(m, path, K):
    m.save_pretrained(path)
    clusters = np.random.default_rng(0).uniform(-1, 1, (K, 3)).tolist()
    (path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "ImageGPTImageProcessor", "clusters": clusters})
    )


def hf_logits(m, x, K):
    inp = torch.cat([torch.full((len(x), 1), K), x[:, :-1]], 1)
    with torch.no_grad():
        return m(input_ids=inp).logits


@pytest.mark.parametrize("K, res, d, L, h", CONFIGS)
def test_hf_to_igpt_parity(tmp_path, K, res, d, L, h):
    hf = hf_random(K, res, d, L, h)
    save_hf(hf, tmp_path / "hf", K)
    main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    ours = igpt.load_run(str(tmp_path / "run"))
    assert ours.config.bias and ours.config.vocab_size == K
    T = res * res
    x = torch.randint(0, K, (3, T))
    close(ours.logits(x), hf_logits(hf, x, K))
    # hidden states of every layer: HF's hidden_states[i] is the input of block i (the last one is after ln_f)
    inp = torch.cat([torch.full((3, 1), K), x[:, :-1]], 1)
    with torch.no_grad():
        hs = hf.transformer(input_ids=inp, output_hidden_states=True).hidden_states
        mine = ours.get_intermediate_layers(x, list(range(L + 1)), norm=False)
    for i in range(L):
        close(mine[i], hs[i])
    close(ours.ln_f(mine[L]), hs[L])
    # identical greedy continuations from the same prefix
    prefix = x[:, : T // 2]
    ids = torch.cat([torch.full((3, 1), K), prefix], 1)
    with torch.no_grad():  # an explicit attention mask: otherwise pad_token_id = SOS would mask the SOS out
        hf_gen = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_length=T + 1,
            do_sample=False,
            use_cache=True,
            pad_token_id=K,
        )
    torch.testing.assert_close(igpt.generate(ours, prefix, T - T // 2, temperature=0), hf_gen[:, 1:])
    # our mean-pooled final features equal what HF's classification head pools
    clf = ImageGPTForImageClassification(hf.config).eval()
    clf.transformer.load_state_dict(hf.transformer.state_dict())
    with torch.no_grad():
        clf.score.weight.copy_(torch.eye(clf.config.num_labels, d))
        pooled = clf(input_ids=inp).logits
    close(ours.features(x, [L])[L][:, : clf.config.num_labels], pooled)
    pal = np.load(tmp_path / "run" / "palette.npy")
    assert pal.shape == (K, 3) and pal.min() >= 0 and pal.max() <= 255


@pytest.mark.parametrize("K, res, d, L, h", CONFIGS)
@pytest.mark.parametrize("bias", [False, True])
def test_igpt_to_hf_parity(tmp_path, K, res, d, L, h, bias):
    torch.manual_seed(1)
    cfg = IGPTConfig(vocab_size=K, n_positions=res * res, n_layer=L, n_embd=d, n_head=h, bias=bias)
    ours = IGPT(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    from igpt.files import write_json_atomic
    from igpt.training.checkpoint import save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    write_json_atomic(run / "run.json", {"model": cfg.to_dict()})
    np.save(run / "palette.npy", np.linspace(0, 255, K, dtype=np.float32)[:, None])  # a grey palette
    save_checkpoint(run, 0, ours.state_dict(), {}, {"step": 0}, keep=set())
    main(["convert", "--to-hf", str(run), "--out", str(tmp_path / "hf")])
    _, info = ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # the bare trunk takes every weight; the output head is the only key it has no place for
    _, info = ImageGPTModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and set(info["unexpected_keys"]) <= {"lm_head.weight"}, info
    hf = ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, K, (2, res * res))
    close(hf_logits(hf, x, K), ours.logits(x))
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert np.asarray(pre["clusters"]).shape == (K, 3)


def test_refusals(tmp_path, capsys):
    cfg = IGPTConfig(vocab_size=8, n_positions=16, n_layer=1, n_embd=16, n_head=2, objective="bert")
    from igpt.files import write_json_atomic
    from igpt.training.checkpoint import save_checkpoint

    run = tmp_path / "bert"
    run.mkdir()
    write_json_atomic(run / "run.json", {"model": cfg.to_dict()})
    save_checkpoint(run, 0, IGPT(cfg).state_dict(), {}, {"step": 0}, keep=set())
    for args, expect in [
        (["--to-hf", str(run), "--out", str(tmp_path / "o")], "BERT"),
        (["--from-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], "no config.json"),
    ]:
        with pytest.raises(SystemExit):
            main(["convert", *args])
        assert expect in capsys.readouterr().err
    hf = hf_random(8, 4, 16, 1, 2)
    hf.save_pretrained(tmp_path / "hf")  # no preprocessor config: the palette must be given
    with pytest.raises(SystemExit):
        main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o")])
    assert "--palette" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
