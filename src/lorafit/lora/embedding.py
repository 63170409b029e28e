"""LoRA on nn.Embedding, PEFT's layout (no dropout), with PEFT's initialisation (A zero, B normal) or Modalities'
(A normal, B zero): `embedding_init`. Either starts the adapter at zero; they differ in which factor learns first."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the universal spelling
from torch import nn

from lorafit.lora.hyper import check_hyper
from lorafit.lora.layers import LoraLayer, _new_param

# "peft": A = 0, B ~ N(0, 1) (PEFT's reset_lora_parameters); "modalities": A ~ N(0, 1), B = 0 (the Modalities lora
# branches' LoRAEmbedding.reset_parameters)
EMBEDDING_INITS = ("peft", "modalities")


class LoraEmbedding(LoraLayer, nn.Embedding):
    """nn.Embedding + LoRA, PEFT's layout: A (r, num_embeddings), B (embedding_dim, r), no dropout.

    Initialised as PEFT does (`embedding_init` "peft": A zero, B ~ N(0, 1)) or as Modalities' LoRAEmbedding does
    ("modalities": A ~ N(0, 1), B zero); the adapter starts at zero either way.
    """

    def __init__(
        self,
        base: nn.Embedding,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        embedding_init: str = "peft",
    ):
        check_hyper(r, alpha, dropout, init)
        if embedding_init not in EMBEDDING_INITS:
            raise ValueError(f"embedding_init must be one of {', '.join(EMBEDDING_INITS)}, got {embedding_init!r}")
        self._build(base, r, alpha, dropout=dropout, use_rslora=use_rslora, init=init, embedding_init=embedding_init)

    def _build(
        self,
        base: nn.Embedding,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        embedding_init: str = "peft",
        generator: torch.Generator | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.embedding_init = embedding_init
        for attr in (
            "num_embeddings",
            "embedding_dim",
            "padding_idx",
            "max_norm",
            "norm_type",
            "scale_grad_by_freq",
            "sparse",
        ):
            setattr(self, attr, getattr(base, attr))
        self.weight = base.weight
        # PEFT applies no dropout to embedding adapters (dropping token ids makes no sense); match it
        self._setup_lora(r, alpha, 0.0, use_rslora, init)
        self.lora_embedding_A = _new_param((self.r, self.num_embeddings), base.weight)
        self.lora_embedding_B = _new_param((self.embedding_dim, self.r), base.weight)
        self._first_init(generator)
        self.train(base.training)

    base_kind = "Embedding"

    @property
    def feature_dims(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def lora_param_suffixes(self) -> tuple[str, str]:
        return ("lora_embedding_A", "lora_embedding_B")

    @property
    def zero_factor_suffix(self) -> str:
        return "lora_embedding_B" if self.embedding_init == "modalities" else "lora_embedding_A"

    def _delta_to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T  # (num_embeddings, dim) like the embedding table

    def _initial_factors(self, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = torch.zeros(self.r, self.num_embeddings), torch.zeros(self.embedding_dim, self.r)
        # the factor that is drawn (N(0, 1)) is the one the other's first gradient flows through
        nn.init.normal_(a if self.embedding_init == "modalities" else b, generator=generator)
        return a, b

    def _embed(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            x, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._embed(x, self.weight)
        if self.merged:
            return out
        after_a = self._embed(x, self.lora_embedding_A.T)
        return out + (after_a @ self.lora_embedding_B.T) * self.scaling

    def to_base(self) -> nn.Embedding:
        with torch.device("meta"):
            plain = nn.Embedding(
                self.num_embeddings,
                self.embedding_dim,
                self.padding_idx,
                self.max_norm,
                self.norm_type,
                self.scale_grad_by_freq,
                self.sparse,
            )
        plain.weight = self.weight
        return plain.train(self.training)

    def extra_repr(self) -> str:
        init = ", embedding_init=modalities" if self.embedding_init == "modalities" else ""
        return f"{nn.Embedding.extra_repr(self)}, {self.lora_extra_repr()}{init}"
