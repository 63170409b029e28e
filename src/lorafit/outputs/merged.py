"""Merged export: the adapter folded into the base weights, saved as a plain Hugging Face folder.

Before reporting success, the merged model's logits on a probe batch are compared with the unmerged
adapter model's; the export is refused (and nothing is left behind) if they differ beyond tolerance.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from lorafit.atomic import atomic_folder
from lorafit.console import info, terminal_progress_bars
from lorafit.errors import UserError
from lorafit.frozen.nf4 import dequantize_nf4_linears
from lorafit.lora import merge_and_unload

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. What is the capital of France?"


def probe_batch(model, tokenizer) -> torch.Tensor:
    if tokenizer is not None:
        ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    else:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=generator)
    return ids.to(next(model.parameters()).device)


@torch.no_grad()
def export_merged(model, tokenizer, output_dir: Path, *, overwrite: bool = False, atol: float | None = None) -> float:
    """Write `output_dir`: merged model (safetensors), config, tokenizer. Returns the max logit difference."""

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise UserError(f"output folder is not empty: {output_dir}; choose a new --output_dir")
    model = model.eval()
    ids = probe_batch(model, tokenizer)
    expected = model(input_ids=ids).logits.float()

    # NF4 weights cannot be deep-copied exactly (torchao re-quantises on clone); the merge dequantises them anyway,
    # and the dequantised weights compute exactly what the NF4 ones did
    dequantize_nf4_linears(model)
    # bf16-stored frozen weights (frozen_dtype) merge in fp32 (merge_and_unload): the export is the base as trained
    # (rounded to bf16) plus the adapter, in one dtype, and compares with the adapter model at fp32 tolerance
    merged = merge_and_unload(copy.deepcopy(model))
    got = merged(input_ids=ids).logits.float()
    diff = (got - expected).abs().max().item()
    dtype = next(merged.parameters()).dtype
    tolerance = (
        atol if atol is not None else (1e-4 if dtype == torch.float32 else 5e-2) * max(1.0, expected.abs().max().item())
    )
    if not diff <= tolerance:
        raise UserError(
            f"merged model differs from the adapter model: max |logit diff| {diff:.3g} > {tolerance:.3g}; "
            "nothing was written"
        )
    with atomic_folder(output_dir) as tmp:
        info(f"writing the merged model to {output_dir}")
        with terminal_progress_bars():  # a large model takes a while: a bar at a terminal, never in a log
            merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    info(
        f"merged model written to {output_dir} "
        f"(max |logit diff| vs adapter model {diff:.2e}, tolerance {tolerance:.1e})"
    )
    return diff
