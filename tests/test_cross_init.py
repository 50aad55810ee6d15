"""Cross Initialization equals an independent computation of METHODS.md 2.2 and lands at LayerNorm-output scale."""

from __future__ import annotations

import pytest
import torch

from core.cross_init import celebrity_init, initial_rows, read_names, word_cross_init, word_init
from core.errors import InputError
from core.protocols import Model

NAMES = ["Adam Sandler", "Meryl Streep", "Keanu Reeves", "Cher", "Shah Rukh Khan", "Serena Williams"]


def _reference_output(model, tokenizer, seq_embeds: torch.Tensor, layer: str) -> torch.Tensor:
    """Run a transformers CLIP text model on inputs_embeds by hand: positions, causal encoder, final LN."""
    text_model = getattr(model, "text_model", model)
    hidden = text_model.embeddings(inputs_embeds=seq_embeds.unsqueeze(0))
    length = hidden.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1).view(1, 1, length, length)
    states = [hidden]
    for block in text_model.encoder.layers:
        out = block(states[-1], causal)
        states.append(out[0] if isinstance(out, tuple) else out)
    if layer == "final_ln":
        return text_model.final_layer_norm(states[-1])[0]
    return states[-2][0]


def _reference_celebrity_init(encoder, names: list[str], n: int) -> torch.Tensor:
    """The reference procedure: per-name [BOS, t.., EOS] rows, column means, padded sequence, outputs 1..n."""
    tok = encoder.tokenizer
    table = encoder.model.get_input_embeddings().weight.detach()
    columns: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for name in names:
        ids = tok(name)["input_ids"]  # with BOS and EOS, no padding
        for i in range(1, min(len(ids) - 1, n + 1)):
            columns[i - 1].append(table[ids[i]])
    means = torch.stack([torch.stack(c).mean(0) for c in columns])
    pad = [table[tok.pad_token_id]] * (75 - n)
    seq = torch.stack([table[tok.bos_token_id], *means, table[tok.eos_token_id], *pad])
    with torch.no_grad():
        return _reference_output(encoder.model, tok, seq, encoder.layer)[1 : 1 + n]


@pytest.mark.parametrize("n_tokens", [1, 2, 3])
def test_celebrity_init_matches_reference(any_model: Model, n_tokens: int) -> None:
    for encoder in any_model.encoders:
        ours = celebrity_init(encoder, n_tokens, NAMES)
        expected = _reference_celebrity_init(encoder, NAMES, n_tokens)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_full_name_list_rows_are_layernorm_scale(any_model: Model) -> None:
    names = read_names()
    assert len(names) >= 600
    rows = initial_rows(any_model, "celebrity", 2)
    for encoder in any_model.encoders:
        raw_norm = float(encoder.token_table().norm(dim=1).mean())
        norms = rows[encoder.key].norm(dim=1)
        if encoder.layer == "final_ln":  # LayerNorm output: norm about sqrt(width) times |gamma| (1 here)
            width = encoder.width
            assert torch.all((norms > 0.7 * width**0.5) & (norms < 1.3 * width**0.5)), norms
        assert float(norms.min()) > 10 * raw_norm  # the "cross": far above raw token-row scale


def test_word_cross_init_uses_encoder_output(sd1_model: Model) -> None:
    encoder = sd1_model.encoders[0]
    rows = word_cross_init(encoder, "a person", 2)
    ids = encoder.tokenizer("a person")["input_ids"]
    table = encoder.model.get_input_embeddings().weight.detach()
    seq = torch.stack([table[i] for i in ids] + [table[encoder.tokenizer.pad_token_id]] * (77 - len(ids)))
    with torch.no_grad():
        expected = _reference_output(encoder.model, encoder.tokenizer, seq, encoder.layer)[1:3]
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=1e-5)


def test_word_init_copies_raw_row(sd1_model: Model) -> None:
    encoder = sd1_model.encoders[0]
    rows = word_init(encoder, "person", 3)
    person = encoder.tokenizer("person", add_special_tokens=False)["input_ids"][0]
    assert rows.shape == (3, 32) and torch.equal(rows[2], encoder.token_table()[person])


def test_init_word_errors_name_the_fix(sd1_model: Model) -> None:
    encoder = sd1_model.encoders[0]
    with pytest.raises(InputError, match="single token"):
        word_init(encoder, "photographer portrait", 1)
    with pytest.raises(InputError, match="exactly 2 tokens"):
        word_cross_init(encoder, "a tall person", 2)
