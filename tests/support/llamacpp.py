"""The real llama.cpp (through llama-cpp-python) reading lorafit's GGUF files: load, tokenize, logits, greedy tokens.

llama-cpp-python is installed by scripts/install_llamacpp.sh (scripts/test.sh runs it). Without it the `llamacpp`
tests fail under CI (CI=true: the tier must run there) and are skipped elsewhere with the command to install it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import pytest


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        message = "llama.cpp (llama-cpp-python) is not installed: run `bash scripts/install_llamacpp.sh`"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI is set: the llamacpp tier must run there)")
        pytest.skip(message)
    return llama_cpp


@contextmanager
def load(path, *, lora=None, n_ctx: int = 256, f32_cache: bool = False):
    """A llama.cpp model from a GGUF file (plus a GGUF LoRA adapter), keeping the logits of every position.

    llama.cpp keeps its KV cache in f16 by default (what users run); `f32_cache` keeps it in f32, so that an f32 file
    gives the Hugging Face model's logits to float rounding and a wrong weight cannot hide in the cache's error."""
    llama_cpp = require_llama_cpp()
    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    if f32_cache:
        kwargs |= {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, seed=0, verbose=False, **kwargs
    )
    try:
        yield llm
    finally:
        llm.close()  # now, not in __del__ at interpreter exit (which llama-cpp-python reports as an error)


def logits(llm, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) logits llama.cpp computes for `ids` (no BOS added: the ids are given as they are)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy decoding, one token at a time: the arg-max of the last position's logits, until `eos`."""
    llm.reset()
    llm.eval(ids)
    out = []
    while len(out) < max_new_tokens:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token == eos:
            break
        llm.eval([token])
    return out


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's own tokenization of `text` (special tokens parsed, no BOS added)."""
    return llm.tokenize(text.encode(), add_bos=False, special=True)
