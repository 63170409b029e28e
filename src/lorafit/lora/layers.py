"""LoRA layers: nn.Linear, nn.Embedding and GPT-2's Conv1D with a low-rank adapter beside the frozen base.

Each LoRA layer is a subclass of its base class that takes over the base module's own `weight`/`bias`
Parameters (no copy), so the base parameter names stay what they were (`...q_proj.weight`): a base
checkpoint loads into an injected model by the same keys, and tied weights stay tied. The adapter adds
`lora_A.weight` (r, in) and `lora_B.weight` (out, r) (embeddings: `lora_embedding_A` / `lora_embedding_B`),
exactly PEFT's names and shapes, as plain nn.Parameters on the base weight's device and dtype (meta
included), so FSDP2/DDP see ordinary parameters. Nothing here merges implicitly: `train()`/`eval()` keep
the unmerged path.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the universal spelling
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.lora.frozen import frozen_linear

Init = Literal["kaiming", "gaussian"]
INITS: tuple[str, ...] = ("kaiming", "gaussian")


class LoraWeight(nn.Module):
    """Holds one LoRA factor as `weight`, so keys read `...lora_A.weight` like PEFT's (adapter name stripped).

    Deliberately not an nn.Linear: `all-linear` and later matching never mistake it for a base layer.
    """

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, dtype={self.weight.dtype}"


def _new_param(shape: tuple[int, ...], like: torch.Tensor) -> nn.Parameter:
    # torch.empty on the base weight's device (meta stays meta: nothing is allocated before weights load)
    return nn.Parameter(torch.empty(shape, device=like.device, dtype=like.dtype))


def copy_full_tensor(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into `param`, which may be an FSDP2 DTensor shard (no communication)."""
    with torch.no_grad():
        if param.device.type == "meta":
            return
        try:
            from torch.distributed.tensor import DTensor, distribute_tensor
        except ImportError:  # torch built without distributed
            DTensor = None  # noqa: N806
        if DTensor is not None and isinstance(param, DTensor):
            # every rank holds the same full tensor, so each cuts its own shard locally (src_data_rank=None)
            local = distribute_tensor(
                full.to(param.device), param.device_mesh, param.placements, src_data_rank=None
            ).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)


class LoraLayer:
    """Behaviour shared by the LoRA layers (a mixin placed before the base class)."""

    r: int
    lora_alpha: float
    scaling: float
    use_rslora: bool
    init: str
    merged: bool
    lora_dropout: nn.Dropout | None

    def _setup_lora(self, r: int, alpha: float, dropout: float, use_rslora: bool, init: str) -> None:
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        if init not in INITS:
            raise ValueError(f"unknown LoRA init {init!r}; valid: {', '.join(INITS)}")
        self.r = int(r)
        self.lora_alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        # rsLoRA keeps the update's scale independent of r (Kalajdzievski 2023); PEFT's definition
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        self.init = init
        self.merged = False
        # p=0: no module at all, so forward skips the call (and no Dropout shows up in the tree)
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else None

    # --- per-type pieces -------------------------------------------------------------------------
    @property
    def base_kind(self) -> str:
        raise NotImplementedError

    @property
    def feature_dims(self) -> tuple[int, int]:
        """(in, out) of the adapter: the product B @ A is (out, in)."""
        raise NotImplementedError

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with A: (r, in) and B: (out, r)."""
        raise NotImplementedError

    def lora_param_suffixes(self) -> tuple[str, str]:
        """State-dict suffixes of A and B under this module, as PEFT names them."""
        return ("lora_A.weight", "lora_B.weight")

    def _delta_to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta  # nn.Linear stores (out, in), the layout of B @ A

    def _initial_factors(self, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh A and B as full fp32 CPU tensors: A kaiming-uniform (a=sqrt 5) or N(0, 1/r), B zero (PEFT's)."""
        n_in, n_out = self.feature_dims
        a = torch.empty(self.r, n_in)
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        else:
            nn.init.normal_(a, std=1 / self.r, generator=generator)
        return a, torch.zeros(n_out, self.r)

    # --- shared behaviour ------------------------------------------------------------------------
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise the adapter so that it computes zero (B or A is zero); a no-op on meta.

        Layers initialise themselves when created (from the global RNG); call this again after a meta build.
        """
        a, b = self._initial_factors(generator)
        param_a, param_b = self.lora_factors()
        copy_full_tensor(param_a, a)
        copy_full_tensor(param_b, b)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, in the base weight's layout (so it adds straight onto `weight`)."""
        a, b = self.lora_factors()
        return self._delta_to_weight_layout((b.float() @ a.float()) * self.scaling)

    def merge(self, delta: torch.Tensor | None = None) -> None:
        """Add the adapter into the base weight (explicit only). Safe to call twice."""
        if self.merged:
            return
        delta = self.delta_weight() if delta is None else delta
        weight = self.weight
        with torch.no_grad():
            # add in fp32 and round once: a bf16 `W += delta.to(bf16)` would round the delta first
            weight.copy_((weight.float() + delta).to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the adapter from the base weight again (exact in fp32 up to rounding)."""
        if not self.merged:
            return
        weight = self.weight
        with torch.no_grad():
            weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def lora_extra_repr(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        return f"r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:g}{rs}, merged={self.merged}"


class _MatrixLora(LoraLayer):
    """A/B as `lora_A`/`lora_B` submodules, applied to the layer input: Linear and Conv1D."""

    lora_A: LoraWeight  # noqa: N815 - PEFT's names, kept for identical state-dict keys
    lora_B: LoraWeight  # noqa: N815

    def _add_factors(self, n_in: int, n_out: int, like: torch.Tensor) -> None:
        self.lora_A = LoraWeight(_new_param((self.r, n_in), like))
        self.lora_B = LoraWeight(_new_param((n_out, self.r), like))

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight, self.lora_B.weight

    def _lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        # dropout on the adapter input only: the frozen base path sees x unchanged (PEFT's definition)
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        return F.linear(F.linear(x, self.lora_A.weight), self.lora_B.weight) * self.scaling


class LoraLinear(_MatrixLora, nn.Linear):
    """nn.Linear + LoRA: `y = x W^T + b + scaling * (dropout(x) A^T) B^T`."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "kaiming"):  # fmt: skip
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self._setup_lora(r, alpha, dropout, use_rslora, init)
        self._add_factors(self.in_features, self.out_features, base.weight)
        self.reset_lora_parameters()
        self.train(base.training)

    base_kind = "Linear"

    @property
    def feature_dims(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = frozen_linear(x, self.weight, self.bias)  # F.linear, or a bf16-stored frozen weight cast up
        return out if self.merged else out + self._lora_branch(x)

    def to_base(self) -> nn.Linear:
        """A plain nn.Linear owning this layer's weight/bias Parameters (the adapter is dropped)."""
        with torch.device("meta"):
            plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight = self.weight
        plain.register_parameter("bias", self.bias)
        return plain.train(self.training)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.lora_extra_repr()}"


class LoraConv1D(_MatrixLora, Conv1D):
    """GPT-2's Conv1D (weight stored (in, out), i.e. PEFT's fan_in_fan_out) + LoRA."""

    def __init__(self, base: Conv1D, r: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "kaiming"):  # fmt: skip
        nn.Module.__init__(self)
        self.nf, self.nx = base.nf, base.nx
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self._setup_lora(r, alpha, dropout, use_rslora, init)
        self._add_factors(self.nx, self.nf, base.weight)
        self.reset_lora_parameters()
        self.train(base.training)

    base_kind = "Conv1D"
    fan_in_fan_out = True

    @property
    def feature_dims(self) -> tuple[int, int]:
        return self.nx, self.nf

    def _delta_to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T  # Conv1D keeps (in, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = Conv1D.forward(self, x)
        return out if self.merged else out + self._lora_branch(x)

    def to_base(self) -> Conv1D:
        with torch.device("meta"):
            plain = Conv1D(self.nf, self.nx)
        plain.weight = self.weight
        plain.register_parameter("bias", self.bias)
        return plain.train(self.training)

    def __repr__(self) -> str:
        return f"LoraConv1D(nf={self.nf}, nx={self.nx}, {self.lora_extra_repr()})"


class LoraEmbedding(LoraLayer, nn.Embedding):
    """nn.Embedding + LoRA, PEFT's layout: A (r, num_embeddings), B (embedding_dim, r), no dropout.

    Initialised as PEFT does: A zero and B normal, so the adapter starts at zero like the others.
    """

    def __init__(self, base: nn.Embedding, r: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "kaiming"):  # fmt: skip
        nn.Module.__init__(self)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                     "sparse"):  # fmt: skip
            setattr(self, attr, getattr(base, attr))
        self.weight = base.weight
        # PEFT applies no dropout to embedding adapters (dropping token ids makes no sense); match it
        self._setup_lora(r, alpha, 0.0, use_rslora, init)
        self.lora_embedding_A = _new_param((self.r, self.num_embeddings), base.weight)
        self.lora_embedding_B = _new_param((self.embedding_dim, self.r), base.weight)
        self.reset_lora_parameters()
        self.train(base.training)

    base_kind = "Embedding"

    @property
    def feature_dims(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B

    def lora_param_suffixes(self) -> tuple[str, str]:
        return ("lora_embedding_A", "lora_embedding_B")

    def _delta_to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T  # (num_embeddings, dim) like the embedding table

    def _initial_factors(self, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.empty(self.embedding_dim, self.r)
        nn.init.normal_(b, generator=generator)
        return torch.zeros(self.r, self.num_embeddings), b

    def _embed(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._embed(x, self.weight)
        if self.merged:
            return out
        after_a = self._embed(x, self.lora_embedding_A.T)
        return out + (after_a @ self.lora_embedding_B.T) * self.scaling

    def to_base(self) -> nn.Embedding:
        with torch.device("meta"):
            plain = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, self.max_norm,
                                 self.norm_type, self.scale_grad_by_freq, self.sparse)  # fmt: skip
        plain.weight = self.weight
        return plain.train(self.training)

    def extra_repr(self) -> str:
        return f"{nn.Embedding.extra_repr(self)}, {self.lora_extra_repr()}"


# exact base types we know how to wrap; a subclass may change forward (quantised, scaled embeddings), so no isinstance
LORA_CLASSES: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: LoraLinear,
    nn.Embedding: LoraEmbedding,
    Conv1D: LoraConv1D,
}
SUPPORTED_TYPES = "nn.Linear, nn.Embedding, transformers Conv1D (GPT-2)"


def wrap(base: nn.Module, r: int, alpha: float, *, dropout: float, use_rslora: bool, init: str) -> LoraLayer:
    cls = LORA_CLASSES[type(base)]
    return cls(base, r, alpha, dropout=dropout, use_rslora=use_rslora, init=init)
