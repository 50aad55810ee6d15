"""Cross Initialization equals an independent computation of METHODS.md 2.2 and lands at LayerNorm-output scale."""

from __future__ import annotations

import pytest
import torch

from core.cross_init import celebrity_init, initial_rows, read_names, word_cross_init, word_init
from core.errors import InputError
from core.protocols import Model
from core.tiny import tiny_model

NAMES = ["Adam Sandler", "Meryl Streep", "Keanu Reeves", "Cher", "Shah Rukh Khan", "Serena Williams"]


# The conditioning layer per family, from METHODS.md 0.2 (not read from the code under test): (hidden state, final LN).
# hidden state -1 is the encoder's last layer, -2 the one before it. The diffusers SD2 text_encoder is already cut to 23
# layers, so its last layer plus final LN is OpenCLIP-H's penultimate layer plus LN; SDXL takes layer -2 without LN.
LAST, PENULTIMATE = -1, -2
CONVENTION: dict[str, tuple[int, bool]] = {"sd1": (LAST, True), "sd2": (LAST, True), "sdxl": (PENULTIMATE, False)}


def _reference_output(model, seq_embeds: torch.Tensor, family: str) -> torch.Tensor:
    """Run a transformers CLIP text model on inputs_embeds by hand: positions, causal encoder, the family's layer."""
    layer, final_ln = CONVENTION[family]
    text_model = getattr(model, "text_model", model)
    hidden = text_model.embeddings(inputs_embeds=seq_embeds.unsqueeze(0))
    length = hidden.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1).view(1, 1, length, length)
    states = [hidden]
    for block in text_model.encoder.layers:
        out = block(states[-1], causal)
        states.append(out[0] if isinstance(out, tuple) else out)
    chosen = states[layer]
    return (text_model.final_layer_norm(chosen) if final_ln else chosen)[0]


def _reference_celebrity_init(encoder, names: list[str], n: int, family: str) -> torch.Tensor:
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
        return _reference_output(encoder.model, seq, family)[1 : 1 + n]


@pytest.mark.parametrize("n_tokens", [1, 2, 3])
def test_celebrity_init_matches_reference(any_model: Model, n_tokens: int) -> None:
    """Each encoder's rows equal METHODS.md 2.2 computed by hand at the layer METHODS.md 0.2 gives the family."""
    for encoder in any_model.encoders:
        ours = celebrity_init(encoder, n_tokens, NAMES)
        expected = _reference_celebrity_init(encoder, NAMES, n_tokens, any_model.family)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def _set_final_layernorm(encoder, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give the encoder's final LayerNorm random non-trivial gamma (0.5..3, random sign) and beta; return them."""
    norm = getattr(encoder.model, "text_model", encoder.model).final_layer_norm
    gen = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(norm.weight.shape, generator=gen) < 0.5, -1.0, 1.0)
    gamma = sign * (0.5 + 2.5 * torch.rand(norm.weight.shape, generator=gen))
    beta = torch.randn(norm.bias.shape, generator=gen)
    with torch.no_grad():
        norm.weight.copy_(gamma)
        norm.bias.copy_(beta)
    return gamma, beta


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_name_list_rows_are_layernorm_scale(family: str) -> None:
    """SD1/SD2 rows are final-LayerNorm outputs: standardised per row, then gamma * z + beta for any gamma, beta."""
    assert len(read_names()) >= 600
    model = tiny_model(family)  # a private copy: its LayerNorm is changed below
    encoder = model.encoders[0]
    standard = initial_rows(model, "celebrity", 2)[encoder.key]  # gamma 1, beta 0: z-scores of the hidden state
    torch.testing.assert_close(standard.mean(dim=1), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(standard.std(dim=1, unbiased=False), torch.ones(2), atol=1e-3, rtol=0)
    gamma, beta = _set_final_layernorm(encoder, seed=7)
    rows = initial_rows(model, "celebrity", 2)[encoder.key]
    torch.testing.assert_close(rows, gamma * standard + beta, atol=1e-4, rtol=1e-4)
    raw_norm = float(encoder.token_table().norm(dim=1).mean())
    assert float(rows.norm(dim=1).min()) > 10 * raw_norm  # the "cross": far above raw token-row scale


def test_sdxl_rows_skip_the_final_layernorm() -> None:
    """SDXL rows come from hidden_states[-2] without LayerNorm: the final LN's gamma and beta do not reach them."""
    model = tiny_model("sdxl")  # a private copy: its LayerNorms are changed below
    before = initial_rows(model, "celebrity", 2)
    for seed, encoder in enumerate(model.encoders):
        _set_final_layernorm(encoder, seed=seed + 7)
    after = initial_rows(model, "celebrity", 2)
    assert [e.key for e in model.encoders] == ["clip_l", "clip_g"]
    for encoder in model.encoders:
        assert torch.equal(before[encoder.key], after[encoder.key])
        assert not torch.allclose(before[encoder.key].mean(dim=1), torch.zeros(2), atol=1e-3)  # not standardised


def test_word_cross_init_uses_encoder_output(sd1_model: Model) -> None:
    encoder = sd1_model.encoders[0]
    rows = word_cross_init(encoder, "a person", 2)
    ids = encoder.tokenizer("a person")["input_ids"]
    table = encoder.model.get_input_embeddings().weight.detach()
    seq = torch.stack([table[i] for i in ids] + [table[encoder.tokenizer.pad_token_id]] * (77 - len(ids)))
    with torch.no_grad():
        expected = _reference_output(encoder.model, seq, "sd1")[1:3]
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
