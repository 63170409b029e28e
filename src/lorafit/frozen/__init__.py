"""Frozen base weights stored in a lower precision than they are computed in: bf16 (linear.py) or 4-bit NF4 (nf4.py).

Not LoRA: any frozen linear layer can be stored this way; lorafit/lora/ builds on it (its linear layer computes
through `frozen_linear`), never the other way round.
"""
