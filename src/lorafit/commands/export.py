"""`lorafit export gguf --model DIR_or_config [--adapter DIR] --output X.gguf [--dtype ...]`: one GGUF file for
llama.cpp / Ollama, the adapter (if any) merged first. `lorafit export gguf-adapter --model BASE --adapter DIR
--output X.gguf`: the adapter alone as a llama.cpp LoRA adapter, to apply over the base's GGUF. `lorafit export
modalities --run RUN --output DIR [--form lora|merged]`: what a run trained as a checkpoint Modalities loads."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a model in another format (GGUF for llama.cpp / Ollama, Modalities checkpoints)"
    )
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    gguf = formats.add_parser("gguf", help="a Llama-family model (+ adapter, merged) as one GGUF file")
    gguf.add_argument(
        "--model", type=Path, required=True, help="merged model folder, base folder (with --adapter), or run config"
    )
    gguf.add_argument("--adapter", type=Path, help="adapter folder (PEFT format) to merge before writing")
    gguf.add_argument("--output", type=Path, required=True, help="the .gguf file to write")
    gguf.add_argument(
        "--dtype",
        default="f16",
        choices=["f32", "f16", "bf16", "q8_0"],
        help="type of the 2-D weights (norms stay f32); default f16",
    )
    gguf.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    gguf.add_argument(
        "--pre-tokenizer",
        metavar="NAME",
        help="llama.cpp's pre-tokenizer name (tokenizer.ggml.pre), only for a tokenizer llama.cpp does "
        "not know; by default it is found as llama.cpp's converter finds it",
    )
    gguf.set_defaults(func=run_gguf)

    adapter = formats.add_parser("gguf-adapter", help="a LoRA adapter alone as a llama.cpp GGUF adapter (--lora)")
    adapter.add_argument(
        "--model",
        type=Path,
        required=True,
        help="the base model folder or run config the adapter was trained on (the adapter applies "
        "to its GGUF, written by `export gguf` without --adapter)",
    )
    adapter.add_argument("--adapter", type=Path, required=True, help="adapter folder (PEFT format)")
    adapter.add_argument("--output", type=Path, required=True, help="the .gguf file to write")
    adapter.add_argument("--dtype", default="f32", choices=["f32", "f16"], help="type of A and B; default f32")
    adapter.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    adapter.set_defaults(func=run_gguf_adapter)

    modalities = formats.add_parser(
        "modalities",
        help="what a run trained as a Modalities checkpoint (the lora branch's LoRA model, or merged)",
        description="Writes OUTPUT/eid_<experiment_id>-model-num_steps_<S>-num_tokens_<T>.bin, a torch state dict "
        "in Modalities' names (huggingface_model.<name>) that model/checkpointed with checkpoint_loading/torch "
        "loads strictly. --form lora: the lora / lora_2 branches' LoRA model (base weights + <module>.lora_A / "
        ".lora_B; load it with the model/lora block printed); --form merged: the plain model, W + (alpha / r) B A.",
    )
    modalities.add_argument(
        "--run",
        type=Path,
        required=True,
        help="a lorafit run folder (its final adapter/, else its latest checkpoint), its "
        "adapter/, or one of its checkpoints/step_N/",
    )
    modalities.add_argument(
        "--model", type=Path, help="the base model folder or config (default: the run's config.resolved.yaml)"
    )
    modalities.add_argument(
        "--output",
        type=Path,
        required=True,
        help="the folder to write the checkpoint into (an existing file is never replaced)",
    )
    modalities.add_argument(
        "--form",
        default="merged",
        choices=["merged", "lora"],
        help="merged (default): a plain model; lora: the lora branch's LoRA model",
    )
    modalities.set_defaults(func=run_modalities)


def _check_output(args: argparse.Namespace) -> None:
    """Before minutes of loading, and never replaced unasked."""
    from lorafit.errors import UserError

    if args.output.exists() and not args.overwrite:
        raise UserError(f"--output: {args.output} exists; choose a new file or pass --overwrite to replace it")
    if args.output.suffix != ".gguf":
        raise UserError(f"--output: {args.output} should end in .gguf (llama.cpp and Ollama look for it)")


def run_gguf(args: argparse.Namespace) -> int:
    from lorafit.console import info
    from lorafit.lora import has_lora, merge_and_unload
    from lorafit.outputs.gguf import export_gguf
    from lorafit.outputs.inference import load_with_adapter

    _check_output(args)
    if args.model.suffix in (".yaml", ".yml") and args.adapter is None:
        from lorafit.errors import UserError

        raise UserError(
            f"--model {args.model} is a run config: it names the base model, not what a run trained, so "
            "this would export the untrained base. Give the run's adapter too (--adapter "
            "experiments/<id>/adapter), or a merged folder as --model"
        )
    if args.pre_tokenizer is not None:
        from lorafit.outputs.gguf.vocab import pre_tokenizer_name

        pre_tokenizer_name(None, args.pre_tokenizer)  # a misspelt name is refused before the model loads
    model, tokenizer = load_with_adapter(args.model, args.adapter, "fp32", flag="--model")
    if has_lora(model):
        model = merge_and_unload(model)
    path = export_gguf(
        model,
        tokenizer,
        args.output,
        dtype=args.dtype,
        overwrite=args.overwrite,
        name=Path(args.model).stem,
        pre_tokenizer=args.pre_tokenizer,
    )
    info(f"GGUF written to {path} ({path.stat().st_size / 1e6:.1f} MB, {args.dtype})")
    return 0


def run_gguf_adapter(args: argparse.Namespace) -> int:
    from lorafit.console import info
    from lorafit.outputs.gguf.adapter import export_gguf_adapter
    from lorafit.outputs.inference import load_with_adapter

    _check_output(args)
    model, _ = load_with_adapter(args.model, args.adapter, "fp32", flag="--model")
    path = export_gguf_adapter(
        model, args.output, dtype=args.dtype, overwrite=args.overwrite, name=Path(args.adapter).name
    )
    info(
        f"GGUF adapter written to {path} ({path.stat().st_size / 1e6:.2f} MB, {args.dtype}); apply it over the "
        f"base's GGUF: llama-cli -m BASE.gguf --lora {path}"
    )
    return 0


def run_modalities(args: argparse.Namespace) -> int:
    from lorafit.atomic import own_folder
    from lorafit.console import info
    from lorafit.errors import UserError
    from lorafit.modalities.export import (
        RUN_MODEL_ENTITIES,
        checkpoint_name,
        lora_state_dict,
        merged_state_dict,
        write_checkpoint,
    )
    from lorafit.outputs.trained_run import find_trained_run, load_trained_model

    own_folder(args.output, "--output", create=False)  # a file or a link there: said before minutes of loading
    run = find_trained_run(args.run)
    name = checkpoint_name(run.experiment_id, run.steps, run.tokens)
    if (args.output / name).exists():
        raise UserError(
            f"--output: {args.output / name} exists; lorafit never replaces a checkpoint: choose another folder"
        )
    model = load_trained_model(run, args.model, RUN_MODEL_ENTITIES)
    if args.form == "lora":
        state, spec = lora_state_dict(model)
    else:
        state, spec = merged_state_dict(model), None
    path = write_checkpoint(state, args.output, name)
    info(
        f"Modalities checkpoint ({args.form}, from {run.source}) written to {path} ({path.stat().st_size / 1e6:.1f} "
        "MB): model/checkpointed + checkpoint_loading/torch loads it (checkpoint_path: this file)"
    )
    if spec is not None:
        info(
            "with this model/lora as the checkpointed model's `model` (around the Hugging Face model), so that the "
            "LoRA layers exist when the file loads:\n" + spec.yaml()
        )
    return 0
