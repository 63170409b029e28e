"""Models and weights: Hugging Face models from a folder or a config, checkpoint loading, the embedded SmolLM2.

- `huggingface`: `model/huggingface_pretrained_model`, `model/huggingface_from_config`
- `checkpointed`: `model/checkpointed`, `checkpoint_loading/torch`
- `tokenizer`: `tokenizer/huggingface`
- `weights`: safe reading of weight files, strict loading with errors naming the tensors
- `deferred`: random init that waits for a checkpoint; `smollm2`: `prepare_smollm2`
"""
