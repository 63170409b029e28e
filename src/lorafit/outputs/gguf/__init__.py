"""`lorafit export gguf`: a (merged) Llama model and its tokenizer as one GGUF file for llama.cpp and Ollama.

The file is written with the `gguf` package (llama.cpp's own writer) into a temporary file next to the output and
renamed into place, so a failure leaves nothing half written; an existing output is replaced only when asked.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lorafit.errors import UserError
from lorafit.lora import has_lora
from lorafit.outputs.gguf.llama import ARCH, check_supported, gguf_tensors, to_numpy, write_hparams
from lorafit.outputs.gguf.output import check_output, gguf_file
from lorafit.outputs.gguf.vocab import bpe_vocab, write_vocab

DTYPES = ("f32", "f16", "bf16", "q8_0")


def _types(dtype: str):
    """(GGML type for 2-D weights, llama.cpp file type) for a `--dtype` choice."""
    import gguf

    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {
        "f32": (q.F32, f.ALL_F32),
        "f16": (q.F16, f.MOSTLY_F16),
        "bf16": (q.BF16, f.MOSTLY_BF16),
        "q8_0": (q.Q8_0, f.MOSTLY_Q8_0),
    }[dtype]


def _encode(array, qtype):
    """`array` (fp32) in `qtype`; 1-D tensors and rows that do not fill whole Q8_0 blocks stay F32 / F16, as in
    llama.cpp's converter."""
    import gguf
    import numpy as np

    q = gguf.GGMLQuantizationType
    if array.ndim == 1 or qtype == q.F32:
        return array.astype(np.float32), q.F32
    if qtype == q.F16:
        return array.astype(np.float16), q.F16
    if qtype == q.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] != 0:
        return array.astype(np.float16), q.F16
    return gguf.quants.quantize(array, qtype), qtype


@torch.no_grad()
def export_gguf(
    model,
    tokenizer,
    output: str | os.PathLike,
    *,
    dtype: str = "f16",
    overwrite: bool = False,
    name: str | None = None,
    pre_tokenizer: str | None = None,
) -> Path:
    """Write `model` (a plain LlamaForCausalLM, adapters merged) and `tokenizer` to the GGUF file `output`.

    `pre_tokenizer` names llama.cpp's pre-tokenizer for a tokenizer llama.cpp does not know (vocab.py)."""
    import gguf

    output = Path(output)
    check_output(output, overwrite=overwrite, dtype=dtype, valid=DTYPES, example="model.gguf")
    if has_lora(model):
        raise UserError("GGUF export needs a plain model: merge the adapter first (lorafit.merge_and_unload)")
    if tokenizer is None:
        raise UserError("GGUF export needs the tokenizer (llama.cpp reads it from the file): the model folder has none")
    shape = check_supported(model)
    vocab = bpe_vocab(tokenizer, shape.vocab_size, pre_tokenizer)
    qtype, file_type = _types(dtype)

    with gguf_file(output, ARCH) as writer:
        writer.add_name(name or output.stem)
        write_hparams(writer, shape)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, vocab)
        for tensor_name, tensor in gguf_tensors(model, shape):
            data, data_type = _encode(to_numpy(tensor), qtype)
            writer.add_tensor(tensor_name, data, raw_dtype=data_type)
    return output


__all__ = ["DTYPES", "export_gguf"]
