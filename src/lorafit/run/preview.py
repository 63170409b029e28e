"""`lorafit data preview`: a few samples of a dataset component exactly as training sees them.

Each sample is decoded piece by piece: the tokens the loss is computed on (targets) inside `[[` `]]`, the rest
(prompts, system messages, template markers, a block's first token) as they are, and `|` where a new
document starts inside a packed block. Above them: how many samples, documents and trained tokens there are,
and what packing cut or dropped (the dataset's own report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafit.config.graph import ConfigGraph
from lorafit.config.run_spec import RunSettings, settings_of
from lorafit.data.blocks import IGNORE_INDEX
from lorafit.data.chat_templates import use_template
from lorafit.data.token_files import pack_file
from lorafit.datasets.packed import InstructionDataset, PackedDataset, PackedInstructionDataset
from lorafit.errors import UserError
from lorafit.models.tokenizer import load_tokenizer
from lorafit.run.build import load_run_config, with_sequence_length

TRAINED_OPEN, TRAINED_CLOSE, NEW_DOCUMENT = "[[", "]]", " | "


def build_dataset(config_path: Path, name: str, overrides: tuple[str, ...]) -> tuple[Any, Any, int]:
    """(the dataset `name` of the run config, the run's tokenizer or None, the run's sequence length)."""
    config, _ = load_run_config(config_path, overrides=overrides)
    key, _, member = name.partition(".")
    if key not in ("train_dataset", "eval_datasets") or (key == "eval_datasets") != bool(member):
        raise UserError(f"--dataset {name}: give train_dataset or eval_datasets.NAME")
    if key not in config:
        raise UserError(
            f"{config_path} has no top-level '{key}' (a Modalities config: preview its dataset files "
            "with --input / --tokenizer)"
        )
    seq = RunSettings.model_validate(settings_of(config)).step_profile.sequence_length
    graph = ConfigGraph(with_sequence_length(config, seq))  # as the run builds it: one sequence length
    built = graph.build(key)
    tokenizer = graph.build("tokenizer") if "tokenizer" in config else None
    if member:
        if member not in built:
            raise UserError(f"--dataset {name}: eval_datasets has {', '.join(built) or 'nothing'}")
        built = built[member]
    return built, tokenizer, seq


def render_sample(sample: dict[str, Any], tokenizer: Any) -> str:
    """The sample's tokens as text, targets marked: token t + 1 is trained when labels[t] is not -100."""
    inputs = sample["input_ids"].tolist()
    labels = sample["labels"].tolist()
    positions = sample.get("position_ids")
    positions = positions.tolist() if positions is not None else list(range(len(inputs)))
    # (token, trained, starts a document): the block's inputs, then the last target when it is trained
    tokens = [(inputs[0], False, False)]
    for t in range(1, len(inputs)):
        tokens.append((inputs[t], labels[t - 1] != IGNORE_INDEX, positions[t] == 0))
    if labels and labels[-1] != IGNORE_INDEX:
        tokens.append((labels[-1], True, False))
    pieces: list[str] = []
    run: list[int] = []
    trained = False

    def flush() -> None:
        if run:
            text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            pieces.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
            run.clear()

    for token, is_trained, new_doc in tokens:
        if new_doc or is_trained != trained:
            flush()
            trained = is_trained
        if new_doc:
            pieces.append(NEW_DOCUMENT)
        run.append(token)
    flush()
    return "".join(pieces)


def summary(dataset: Any, name: str) -> list[str]:
    """Counts of the dataset as built: samples, documents, tokens, what packing did."""
    data = dataset.data
    meta = data.meta
    trained = int(meta.get("num_trained_tokens", data.num_tokens))
    fmt = meta.get("format") or meta["kind"]
    lines = [
        f"{name}: {type(dataset).__name__} over {dataset.prefix}.bin (format {fmt})",
        f"  {len(dataset):,} samples of up to {dataset.sequence_length} tokens; {data.num_documents:,} documents, "
        f"{data.num_tokens:,} tokens, {trained:,} of them trained on",
    ]
    plan = getattr(dataset, "plan", None)
    if plan is not None:
        lines.append(f"  packing: {plan.summary('').removeprefix(': ')}")
    elif hasattr(dataset, "_keep"):  # one sample per conversation, cut at sequence_length
        starts = data.offsets[:-1]
        cut = int(((data.offsets[1:] - starts) > dataset.sequence_length + 1).sum())
        left_out = data.num_documents - len(dataset)
        lines.append(
            f"  not packed (packing: false): {cut:,} conversations cut to sequence_length + 1 = "
            f"{dataset.sequence_length + 1} tokens, {left_out:,} left out (no answer token)"
        )
    else:
        lines.append(
            "  text: documents joined by EOS and cut into blocks of sequence_length + 1 tokens (a document "
            "may go on in the next block)"
        )
    return lines


def preview(dataset: Any, tokenizer: Any, name: str, num_samples: int) -> str:
    if not len(dataset):
        raise UserError(f"{name}: no samples")
    lines = summary(dataset, name)
    lines.append(
        f"trained tokens are inside {TRAINED_OPEN} {TRAINED_CLOSE}; '{NEW_DOCUMENT.strip()}' starts "
        "another document in the same block"
    )
    for i in range(min(num_samples, len(dataset))):
        sample = dataset[i]
        n = len(sample["input_ids"])
        lines += ["", f"--- sample {i} ({n} input tokens) ---", render_sample(sample, tokenizer)]
    return "\n".join(lines)


def preview_file(
    path: Path,
    tokenizer_dir: Path,
    *,
    fmt: str,
    chat_template: str | None,
    sequence_length: int,
    packing: bool,
    num_samples: int,
) -> str:
    """A data file packed into a temporary folder with the tokenizer, previewed as dataset/hf_datasets reads it."""
    import tempfile

    if sequence_length < 2:
        raise UserError(f"--sequence_length must be >= 2, got {sequence_length}")
    tokenizer = use_template(load_tokenizer(tokenizer_dir), chat_template)
    with tempfile.TemporaryDirectory(prefix="lorafit-preview-") as folder:
        packed = pack_file(path, tokenizer, Path(folder) / "preview", fmt=fmt, progress=False)
        prefix = packed.prefix
        if packed.kind == "text":
            dataset = PackedDataset(prefix, sequence_length)
        elif packing:
            dataset = PackedInstructionDataset(prefix, sequence_length)
        else:
            dataset = InstructionDataset(prefix, sequence_length)
        return preview(dataset, tokenizer, str(path), num_samples)
