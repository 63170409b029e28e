"""Tiny, offline stand-ins for real models: a BPE tokenizer trained in milliseconds, a 2-layer Llama and a 2-layer
GPT-2. Every test builds its small models here (bigger shapes through the overrides).

They have the real classes (PreTrainedTokenizerFast, LlamaForCausalLM, GPT2LMHeadModel) and the real file formats,
only small.
"""

from __future__ import annotations

from pathlib import Path

# SmolLM2's chat template shape (ChatML), trimmed: enough to exercise prompt masking.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore.",
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.",
    "Question: what is two plus two? Answer: four. Question: what colour is the sky? Answer: blue.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?'\"()[]{}<>-_=+/*",
]


def make_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# The tiny Llama's config values, as a YAML author would write them (rope_theta: the legacy name, still read).
LLAMA = dict(
    vocab_size=384,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def llama_config(vocab_size: int = 384, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA, "vocab_size": vocab_size, **overrides})


def make_llama(seed: int = 0, **overrides):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**overrides))
    return model.eval()


def make_gpt2(seed: int = 0, **overrides):
    """A 2-layer GPT-2 (Conv1D layers, fan_in_fan_out), without dropout: gradients are compared in train mode."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    values = dict(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    values.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**values, **overrides})).eval()


def save_tiny_model_dir(path: Path, seed: int = 0, **overrides) -> Path:
    """An HF model folder (config.json + model.safetensors + tokenizer files), like a real checkpoint."""
    path.mkdir(parents=True, exist_ok=True)
    make_llama(seed, **overrides).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
