"""Sampling with a per-stage identity: a MODEL whose cross-attention takes each stage's key and value prompts.

staged_model clones the MODEL and adds one attn2_patch. At every cross-attention call it reads the sampler's sigmas
from extra_options["sigmas"] (both cores set it: the 2024 core's calc_cond_uncond_batch and today's calc_cond_batch
put the step's sigma, one per latent, into transformer_options), turns them into training timesteps with the
MODEL's model_sampling.timestep (in both cores the nearest entry of its sigma table in log space, the very timestep
the UNet is conditioned on; rounded in case a schedule gives fractions), and picks each row's stage with the
identity's StageSchedule. The batch is split into the chunks of extra_options["cond_or_uncond"]; in
positive chunks (COND) every row whose context is exactly the prompt Apply Identity encoded gets the stage's key
context as keys and its value context as values. Negative chunks and other prompts pass untouched. The pooled
vector (SDXL) stays the plain prompt's.

ComfyUI batches conds of different token lengths by repeating each context to their least common multiple (repeated
tokens leave attention unchanged), so the plain prompt is matched in its repeated form too, and a stage context is
repeated to the batch's length; where that length is not a multiple of the stage's, the whole batch is repeated to
a common multiple first, as ComfyUI itself would have done.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core.errors import InputError
from ..core.stages import StageSchedule
from .comfy_backend import COND, AttentionPatch, model_object

StageContexts = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per stage: (keys context, values context), (1, L, D)


def _check_stages(plain_context: torch.Tensor, stages: StageContexts, schedule: StageSchedule) -> None:
    """One (keys, values) pair per stage, all (1, L, D) of one length and of the plain prompt's width."""
    if len(stages) != schedule.count:
        raise InputError(f"stages: got {len(stages)} key/value prompts for the identity's {schedule.count} stages")
    shapes = {tuple(t.shape) for pair in stages for t in pair}
    if len(shapes) != 1:
        raise InputError(f"stages: the stage prompts have different shapes {sorted(shapes)}; encode them alike")
    shape = shapes.pop()
    if len(shape) != 3 or shape[0] != 1 or plain_context.dim() != 3 or shape[2] != plain_context.shape[2]:
        raise InputError(
            f"stages: stage prompts of shape {list(shape)} do not fit the prompt's context "
            f"{list(plain_context.shape)}; give (1, tokens, width) contexts from the same CLIP"
        )


def tiled(context: torch.Tensor, length: int) -> torch.Tensor:
    """context (B, L, D) repeated along its tokens to length (a multiple of L), as ComfyUI pads batched conds."""
    return context if context.shape[1] == length else context.repeat(1, length // context.shape[1], 1)


def stages_at(sigmas: torch.Tensor, model_sampling: object, schedule: StageSchedule) -> torch.Tensor:
    """The stage of each sigma: model_sampling.timestep(sigma) rounded to a training timestep, then the schedule's."""
    timesteps = model_sampling.timestep(sigmas.float()).float().round()
    return schedule.stage_of(timesteps)


def _row_sigmas(sigmas: torch.Tensor, rows: int) -> torch.Tensor:
    """sigmas (one per latent, or one in all) for each of rows batch rows: the chunks repeat the latents in order."""
    flat = sigmas.reshape(-1)
    if rows % flat.numel():
        raise RuntimeError(f"stages: {flat.numel()} sigmas do not divide the batch of {rows} into chunks")
    return flat.repeat(rows // flat.numel())


def _positive_rows(cond_or_uncond: Sequence[int], rows: int, device: torch.device) -> torch.Tensor:
    """(rows,) bool: which rows belong to positive (COND) chunks, each chunk rows // len(chunks) rows in order."""
    chunk = rows // len(cond_or_uncond)
    flags = torch.tensor([c == COND for c in cond_or_uncond], dtype=torch.bool)
    return flags.repeat_interleave(chunk).to(device)


def _plain_rows(context: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """(B,) bool: which rows of context are exactly the plain prompt (cast alike, repeated to the context's length)."""
    if context.shape[1] % plain.shape[1] or context.shape[2] != plain.shape[2]:
        return torch.zeros(context.shape[0], dtype=torch.bool, device=context.device)
    target = tiled(plain.to(device=context.device, dtype=context.dtype), context.shape[1])
    return (context == target).flatten(1).all(dim=1)


def stage_patch(model: object, plain_context: torch.Tensor, stages: StageContexts,
                schedule: StageSchedule) -> AttentionPatch:
    """The attn2_patch of staged_model (a plain function: ComfyUI deep-copies model_options, and functions stay shared)."""
    plain = plain_context.detach()
    keys = torch.cat([k.detach() for k, _ in stages])  # (S, L, D)
    values = torch.cat([v.detach() for _, v in stages])
    cast: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage keys and values in the dtype and on the device of like, converted once."""
        at = (like.dtype, like.device)
        if at not in cast:
            cast[at] = (keys.to(device=like.device, dtype=like.dtype), values.to(device=like.device, dtype=like.dtype))
        return cast[at]

    def patch(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra: dict) -> tuple:
        """Each positive row of the plain prompt gets its stage's keys and values; every other row passes as it came."""
        if "sigmas" not in extra or "cond_or_uncond" not in extra:
            raise RuntimeError(
                "stages: the sampler gave no sigmas or cond_or_uncond to the attention patch, so the stage of this "
                "step is unknown; sample the identity's MODEL with a ComfyUI KSampler or SamplerCustom"
            )
        rows = context.shape[0]
        chosen = _positive_rows(extra["cond_or_uncond"], rows, context.device) & _plain_rows(context, plain)
        if not bool(chosen.any()):
            return n, context, value
        stage = stages_at(_row_sigmas(extra["sigmas"], rows), model.model_sampling, schedule).to(context.device)
        stage_keys, stage_values = tables(context)
        length = context.shape[1]
        if length % stage_keys.shape[1]:
            length = math.lcm(length, stage_keys.shape[1])
            context, value = tiled(context, length), tiled(value, length)
        pick = chosen.view(-1, 1, 1)
        new_keys = torch.where(pick, tiled(stage_keys, length)[stage], context)
        new_values = torch.where(pick, tiled(stage_values, length)[stage], value)
        return n, new_keys, new_values

    return patch


def staged_model(model_patcher: object, plain_context: torch.Tensor, stages: StageContexts,
                 schedule: StageSchedule) -> object:
    """A clone of the MODEL that samples the prompt plain_context with each stage's (keys, values) contexts.

    plain_context: the (1, L, D) cond of Apply Identity's CONDITIONING; stages: per stage, the same prompt encoded with
    the identity's key rows and with its value rows (conditioning.encode_stage_contexts); schedule: the identity's.
    """
    import comfy.model_sampling as ms

    sampling = model_object(model_patcher, "model_sampling")
    if not isinstance(sampling, ms.ModelSamplingDiscrete):
        raise InputError(
            f"model: it samples with a continuous schedule ({type(sampling).__name__}), which has no training "
            "timesteps to pick the identity's stages by; sample with the checkpoint's own discrete schedule"
        )
    schedule.check_covers(int(sampling.sigmas.shape[0]))
    _check_stages(plain_context, stages, schedule)
    patched = model_patcher.clone()
    patched.set_model_attn2_patch(stage_patch(patched.model, plain_context, stages, schedule))
    return patched
