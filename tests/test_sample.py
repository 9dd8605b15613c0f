"""Sampling and completion: seeded cache equivalence, kept rows, BERT mask-predict, the grid, refusals."""

import numpy as np
import pytest
import torch
from PIL import Image

from igpt.cli import main
from igpt.data.images import grid_image
from igpt.generation.complete import complete, generate, mask_predict, sample_next
from igpt.model.gpt import IGPT, IGPTConfig


def model(objective="ar"):
    torch.manual_seed(0)
    m = IGPT(IGPTConfig(vocab_size=8, n_positions=36, n_layer=2, n_embd=32, n_head=4, objective=objective))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def test_cached_sampling_equals_full_forward_sampling_under_one_seed():
    m = model()
    prefix = torch.randint(0, 8, (3, 10))
    cached = generate(m, prefix, 26, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    seq = prefix
    for _ in range(26):
        logits = m.logits(torch.cat([seq, torch.zeros(3, 1, dtype=torch.long)], 1))[:, seq.shape[1]]
        seq = torch.cat([seq, sample_next(logits, 0.8, 5, None, g)[:, None]], 1)
    assert torch.equal(cached, seq)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_completion_keeps_rows_and_is_seeded(objective):
    m = model(objective)
    x = torch.randint(0, 8, (2, 36))
    a = complete(m, x, keep=18, num=3, seed=1)
    b = complete(m, x, keep=18, num=3, seed=1)
    assert a.shape == (2, 3, 36) and torch.equal(a, b)
    assert torch.equal(a[:, :, :18], x[:, None, :18].expand(2, 3, 18))
    assert a.min() >= 0 and a.max() < 8
    assert not torch.equal(a, complete(m, x, keep=18, num=3, seed=2))


def test_mask_predict_fills_every_hidden_position_and_greedy_is_deterministic():
    m = model("bert")
    x = torch.randint(0, 8, (2, 36))
    hidden = torch.zeros(2, 36, dtype=torch.bool)
    hidden[:, 20:] = True
    out = mask_predict(m, x, hidden, rounds=4, temperature=0)
    assert torch.equal(out[:, :20], x[:, :20])
    assert torch.equal(out, mask_predict(m, x, hidden, rounds=4, temperature=0))
    # one greedy round fills every hidden position with the model's own prediction there
    one = mask_predict(m, x, hidden, rounds=1, temperature=0)
    want = m.logits(x, hidden).argmax(-1)
    assert torch.equal(one[hidden], want[hidden]) and torch.equal(one[~hidden], x[~hidden])
    assert not torch.equal(one[hidden], x[hidden])  # the input's own tokens were not simply kept


def test_grid_dimensions():
    cells = [[np.zeros((5, 5, 1), np.uint8)] * 4, [np.zeros((5, 5, 3), np.uint8)] * 4]
    g = grid_image(cells, scale=3, pad=2)
    assert g.shape == (2 * (15 + 2) + 2, 4 * (15 + 2) + 2, 3)


def test_sample_cli_grid_and_tokens(micro_run, tmp_path):
    out = tmp_path / "grid.png"
    main(["sample", str(micro_run), "--out", str(out), "--num", "3", "--keep-rows", "4", "--images", "0,1"])
    img = Image.open(out)
    scale = 12  # ceil(96 / 8)
    assert img.size == (5 * (8 * scale + 2) + 2, 2 * (8 * scale + 2) + 2)
    tok = np.load(tmp_path / "grid.npy")
    assert tok.shape == (2, 3, 8, 8)
    from igpt.data.prepared import PreparedData

    data = PreparedData(micro_run.parent / "data")
    kept = data.tokens("test")[[0, 1]].reshape(2, 8, 8)[:, :4]
    assert (tok[:, :, :4] == kept[:, None]).all()
    # completing a user's image file
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8)).save(
        tmp_path / "me.png"
    )
    main(
        [
            "sample",
            str(micro_run),
            "--out",
            str(tmp_path / "f.png"),
            "--image-files",
            str(tmp_path / "me.png"),
        ]
    )
    assert np.load(tmp_path / "f.npy").shape == (1, 4, 8, 8)


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--keep-rows", "9"], "--keep-rows"),
        (["--keep-rows", "-1"], "--keep-rows"),
        (["--top-p", "1.5"], "--top-p"),
        (["--temperature", "-0.5"], "--temperature"),
        (["--images", "0,100000"], "out of range"),
    ],
)
def test_sample_refusals(micro_run, tmp_path, capsys, args, expect):
    with pytest.raises(SystemExit) as e:
        main(["sample", str(micro_run), "--out", str(tmp_path / "x.png"), *args])
    assert e.value.code != 0 and expect in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_run_without_palette_refused(micro_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(micro_run, copy)
    (copy / "palette.npy").unlink()
    with pytest.raises(SystemExit):
        main(["sample", str(copy), "--out", str(tmp_path / "x.png")])
    assert "palette" in capsys.readouterr().err
