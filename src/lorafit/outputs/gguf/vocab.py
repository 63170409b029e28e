"""A byte-level BPE tokenizer (GPT-2 style: SmolLM2, Llama 3) as GGUF `tokenizer.*` metadata.

llama.cpp does not read `tokenizer.json`: it rebuilds the tokenizer from the token list, token types, merges, the
special token ids and a named pre-tokenizer (`tokenizer.ggml.pre`), which selects its own hand-written splitter. The
name is chosen as llama.cpp's converter chooses it (pre_tokenizers.py: the hash of the tokenizer's ids on a fixed
text -> the name of a tokenizer llama.cpp has checked), so a file lorafit writes and one `convert_hf_to_gguf.py`
writes say the same. A tokenizer llama.cpp has not checked is refused unless the caller names the pre-tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from lorafit.errors import UserError
from lorafit.outputs.gguf.pre_tokenizers import CHECK_TEXT, HASHES, NAMES

# llama.cpp's token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# Llama 3's split regex, as its tokenizer.json writes it (llama.cpp's pre-tokenizer "llama-bpe")
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class Vocab:
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def check_hash(tokenizer) -> str:
    """What llama.cpp's converter computes: sha256 of `str(tokenizer.encode(CHECK_TEXT))`."""
    return hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def _byte_level(step: dict) -> bool:
    return step.get("type") == "ByteLevel" and not step.get("add_prefix_space", False)


def _likely_name(pre: dict | None) -> str | None:
    """A llama.cpp pre-tokenizer that splits text as this tokenizer.json `pre_tokenizer` does, when the two are
    plainly the same regex (a hint for the refusal, never used unasked)."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    if len(steps) == 1 and _byte_level(steps[0]) and steps[0].get("use_regex", True):
        return "gpt-2"  # the GPT-2 regex inside ByteLevel
    if (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and _byte_level(steps[1])
        and steps[1].get("use_regex", True)
    ):
        return "smollm"  # every digit alone, then the GPT-2 regex
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT
        and _byte_level(steps[1])
        and not steps[1].get("use_regex", True)
    ):
        return "llama-bpe"
    return None


def pre_tokenizer_name(tokenizer, chosen: str | None = None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for `tokenizer`: `chosen` if given (checked against the names llama.cpp
    accepts), else the name llama.cpp's converter finds for the tokenizer's check hash, else a UserError."""
    if chosen is not None:
        if chosen not in NAMES:
            raise UserError(
                f"--pre-tokenizer: {chosen!r} is not a pre-tokenizer llama.cpp knows (valid: "
                f"{', '.join(sorted(NAMES))})"
            )
        return chosen
    digest = check_hash(tokenizer)
    if digest in HASHES:
        return HASHES[digest][0]
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer")
    likely = _likely_name(pre)
    if likely:
        hint = (
            f"; its pre_tokenizer is the one llama.cpp calls {likely!r}, so --pre-tokenizer {likely} (Python: "
            f"pre_tokenizer={likely!r}) writes a file llama.cpp tokenizes the same way"
        )
    else:
        hint = f"; its pre_tokenizer ({json.dumps(pre)[:200]}) matches none lorafit can name"
    raise UserError(
        "GGUF export: llama.cpp does not know this tokenizer (its check hash "
        f"{digest[:16]}... is not in llama.cpp's convert_hf_to_gguf.py table, which lorafit uses to name the "
        "pre-tokenizer; a tokenizer trained or edited for this model is new to it)"
        + hint
        + ". Name the llama.cpp pre-tokenizer that splits text as yours does with --pre-tokenizer NAME"
    )


def bpe_vocab(tokenizer, vocab_size: int, pre_tokenizer: str | None = None) -> Vocab:
    """The GGUF tokenizer fields of a Hugging Face fast tokenizer; `vocab_size` is the model's (rows of the
    embedding), and ids the tokenizer does not use are written as unused `[PAD<id>]` tokens, as llama.cpp does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("GGUF export needs a fast (tokenizer.json) tokenizer; this one is a slow Python tokenizer")
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or data.get("normalizer"):
        raise UserError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3 use); this tokenizer "
            f"is {model.get('type')} with normalizer {(data.get('normalizer') or {}).get('type')} (a SentencePiece-"
            "style vocabulary such as Llama 2's is not supported yet)"
        )
    pre = pre_tokenizer_name(tokenizer, pre_tokenizer)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())}, the model only {vocab_size}")
    by_id = {index: token for token, index in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(CONTROL if added[token].special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special_ids = {
        name: getattr(tokenizer, f"{name}_token_id")
        for name in ("bos", "eos", "unk", "pad")
        if getattr(tokenizer, f"{name}_token_id", None) is not None
    }
    # whether the tokenizer itself adds BOS / EOS around plain text, as llama.cpp should
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = len(probe) > len(bare) and probe[0] == special_ids.get("bos")
    add_eos = len(probe) > len(bare) and probe[-1] == special_ids.get("eos")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: llama.cpp reads the default one
        template = template.get("default")
    return Vocab(pre, tokens, types, merges, special_ids, add_bos, add_eos, template or None)


def write_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for name, index in vocab.special_ids.items():
        adders[name](index)
    writer.add_add_space_prefix(False)  # byte-level BPE: no SentencePiece-style leading space
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
