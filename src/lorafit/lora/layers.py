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

import torch
import torch.nn.functional as F  # noqa: N812 - the universal spelling
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafit.frozen.linear import FrozenWeightLayer, frozen_linear, plain_linear
from lorafit.lora.hyper import check_hyper, lora_scaling
from lorafit.lora.variants import DECOMPOSING_INITS, dora_merged_weight, dora_weight_norm, initial_factors
from lorafit.models.wrappers import full_tensor, is_dtensor


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
        if is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

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
    alpha: float
    scaling: float
    use_rslora: bool
    init: str
    merged: bool
    lora_dropout: nn.Dropout | None
    use_dora: bool = False
    lora_magnitude_vector: nn.Parameter | None  # DoRA's m, PEFT's name (out,); None without DoRA

    @classmethod
    def from_checked(cls, base: nn.Module, r: int, alpha: float, **options) -> LoraLayer:
        """The layer for numbers checked already, once for every layer (`apply_lora`, the typed model/lora config):
        what injection builds. The constructor is the check for a layer made directly (these classes are public)."""
        layer = cls.__new__(cls)
        layer._build(base, r, alpha, **options)  # options: the constructor's, and `generator` for the first draw
        return layer

    def _setup_lora(self, r: int, alpha: float, dropout: float, use_rslora: bool, init: str) -> None:
        assert r >= 1 and alpha > 0, "LoRA numbers are checked at the API edge (check_hyper)"  # internal invariant
        self.r = int(r)
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(self.alpha, self.r, self.use_rslora)
        self.init = init
        self.merged = False
        self.register_parameter("lora_magnitude_vector", None)
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

    @property
    def zero_factor_suffix(self) -> str:
        """The suffix of the factor that starts at zero (B; an embedding's A under PEFT's init): the only one whose
        first gradient is non-zero, since the other's gradient goes through it."""
        return self.lora_param_suffixes()[1]

    def lora_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(suffix, parameter) of everything the adapter trains: A, B and DoRA's magnitude."""
        named = list(zip(self.lora_param_suffixes(), self.lora_factors(), strict=True))
        if self.lora_magnitude_vector is not None:
            named.append(("lora_magnitude_vector", self.lora_magnitude_vector))
        return named

    def _delta_to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta  # nn.Linear stores (out, in), the layout of B @ A

    def _initial_factors(self, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh A and B as full fp32 CPU tensors: A kaiming-uniform (a=sqrt 5) or N(0, 1/r), B zero (PEFT's).
        Shapes are the parameters' (global ones under FSDP2): a conv's A has its fan-in over the kernel too."""
        shape_a, shape_b = (tuple(p.shape) for p in self.lora_factors())
        a = torch.empty(shape_a)
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        else:
            nn.init.normal_(a, std=1 / self.r, generator=generator)
        return a, torch.zeros(shape_b)

    @staticmethod
    def refusal(base: nn.Module) -> str | None:
        """Why a module of a wrappable type takes no adapter after all (convolutions: lora/conv.py), or None."""
        return None

    # --- shared behaviour ------------------------------------------------------------------------
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise the adapter so that the layer computes what its base did; a no-op on meta.

        kaiming/gaussian: B (or A) is zero. pissa/olora: the top of W moves into A and B, the base weight keeps the
        residual (a second reset restores W first, so it decomposes the original weight again). DoRA: m = ||W||_c.
        Layers draw theirs once when created (from the generator given, else the global RNG); a meta build draws
        here after sharding.
        """
        if self.weight.device.type == "meta":
            return
        param_a, param_b = self.lora_factors()
        if self.init in DECOMPOSING_INITS:
            a, b = self._decompose_base()
        else:
            a, b = self._initial_factors(generator)
        copy_full_tensor(param_a, a)
        copy_full_tensor(param_b, b)
        if self.lora_magnitude_vector is not None:
            weight = self._base_weight_layout(full_tensor(self.weight).to(torch.float32))
            copy_full_tensor(self.lora_magnitude_vector, dora_weight_norm(weight, self.scaling * (b @ a)))
        self.merged = False

    def _first_init(self, generator: torch.Generator | None) -> None:
        """At creation, the one draw of A and B: from `generator` (the run's seed, one generator over the layers in
        model order), else the global RNG; nothing on meta (drawn after sharding). pissa/olora start as a zero
        adapter and decompose in `init_from_base` once the weights are known to be real (a deferred or meta build
        holds garbage here)."""
        if self.init not in DECOMPOSING_INITS:
            self.reset_lora_parameters(generator)
            return
        for param in self.lora_factors():
            copy_full_tensor(param, torch.zeros(param.shape))
        if self.lora_magnitude_vector is not None and self.weight.device.type != "meta":
            weight = self._base_weight_layout(self.weight.detach().to(torch.float32))
            copy_full_tensor(self.lora_magnitude_vector, dora_weight_norm(weight, torch.zeros_like(weight)))

    def init_from_base(self) -> None:
        """What the initial adapter takes from the base weight, once it holds its final values (loaded, stored
        bf16/NF4): pissa/olora decompose it (if not done), DoRA's m = ||W + scaling B A||_c. Draws nothing."""
        if self.weight.device.type == "meta":
            return
        if self.init in DECOMPOSING_INITS:
            if not self.decomposed:
                self.reset_lora_parameters()
            return
        if self.lora_magnitude_vector is not None:
            a, b = (full_tensor(p).detach().to(torch.float32).cpu() for p in self.lora_factors())
            weight = self._base_weight_layout(full_tensor(self.weight).to(torch.float32))
            copy_full_tensor(self.lora_magnitude_vector, dora_weight_norm(weight, self.scaling * (b @ a)))

    def _base_weight_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight as (out, in), the layout of B @ A (the inverse of `_delta_to_weight_layout`)."""
        return self._delta_to_weight_layout(weight)

    def _decompose_base(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PiSSA/OLoRA: A0, B0 from the original W; W becomes W - scaling B0 A0. A0/B0 are kept (non-persistent
        buffers `lora_init_A/B`) for the adapter export, which converts to a plain adapter on the original base."""
        weight = self._base_weight_layout(full_tensor(self.weight).to(torch.float32))
        previous = getattr(self, "lora_init_A", None)
        if previous is not None:  # decomposed before: start from the original weight again
            weight = weight + self.scaling * (self.lora_init_B.float() @ previous.float())
        a0, b0 = initial_factors(self.init, weight, self.r, self.scaling)
        residual = weight - self.scaling * (b0 @ a0)
        copy_full_tensor(self.weight, self._delta_to_weight_layout(residual).to(self.weight.dtype))
        like = self.lora_factors()[0]
        self.register_buffer("lora_init_A", a0.to(like.dtype).to(like.device), persistent=False)
        self.register_buffer("lora_init_B", b0.to(like.dtype).to(like.device), persistent=False)
        return a0, b0

    @property
    def decomposed(self) -> bool:
        """pissa/olora: whether the base weight holds the residual yet (reset_lora_parameters did it)."""
        return getattr(self, "lora_init_A", None) is not None

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, in the base weight's layout (so it adds straight onto `weight`). A conv's factors
        are flattened to (r, in * kernel) and (out, r) first; a matrix's stay as they are."""
        a, b = self.lora_factors()
        return self._delta_to_weight_layout((b.float().flatten(1) @ a.float().flatten(1)) * self.scaling)

    def merged_weight(self) -> torch.Tensor:
        """The weight this layer computes with, in fp32 and the base weight's layout: W + scaling B A, or for DoRA
        m * (W + scaling B A) / ||W + scaling B A||_c (PEFT's merge)."""
        # .to, not .float(): an NF4Tensor (frozen_dtype nf4) dequantises on .to only
        combined = self.weight.to(torch.float32) + self.delta_weight()
        if self.lora_magnitude_vector is None:
            return combined
        as_linear = self._base_weight_layout(combined)
        return self._delta_to_weight_layout(
            dora_merged_weight(as_linear, torch.zeros_like(as_linear), self.lora_magnitude_vector.detach())
        )

    def merge(self) -> None:
        """Fold the adapter into the base weight (explicit only). Safe to call twice."""
        if self.merged:
            return
        weight = self.weight
        with torch.no_grad():
            if self.lora_magnitude_vector is not None:  # unmerging divides by the norm of the unmerged weight
                as_linear = self._base_weight_layout(weight.float() + self.delta_weight())
                self._merged_norm = dora_weight_norm(as_linear, torch.zeros_like(as_linear))
            # computed in fp32 and rounded once: a bf16 `W += delta.to(bf16)` would round the delta first
            weight.copy_(self.merged_weight().to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Undo `merge` (exact in fp32 up to rounding)."""
        if not self.merged:
            return
        weight = self.weight
        with torch.no_grad():
            restored = weight.float()
            if self.lora_magnitude_vector is not None:
                factor = self.lora_magnitude_vector.detach().float() / self._merged_norm
                restored = self._delta_to_weight_layout(self._base_weight_layout(restored) / factor.unsqueeze(1))
            weight.copy_((restored - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def lora_extra_repr(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        rs += ", dora" if self.use_dora else ""
        rs += f", init={self.init}" if self.init in DECOMPOSING_INITS else ""
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}{rs}, merged={self.merged}"


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


class LoraLinear(_MatrixLora, FrozenWeightLayer, nn.Linear):
    """nn.Linear + LoRA: `y = x W^T + b + scaling * (dropout(x) A^T) B^T`.

    DoRA (`use_dora`): `y = m / ||W + scaling B A||_c * (x W^T + scaling x A^T B^T) + b`, the norm detached
    (PEFT's definition, DoRA paper section 4.3); m is `lora_magnitude_vector` (out,), trained with A and B.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
    ):
        check_hyper(r, alpha, dropout, init)
        self._build(base, r, alpha, dropout=dropout, use_rslora=use_rslora, init=init, use_dora=use_dora)

    def _build(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        use_dora: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self._setup_lora(r, alpha, dropout, use_rslora, init)
        self._add_factors(self.in_features, self.out_features, base.weight)
        self.use_dora = bool(use_dora)
        self.lora_magnitude_vector = _new_param((self.out_features,), base.weight) if use_dora else None
        self._first_init(generator)
        self.train(base.training)

    base_kind = "Linear"

    @property
    def feature_dims(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = frozen_linear(x, self.weight, self.bias)  # F.linear, or a bf16-stored frozen weight cast up
        if self.merged:
            return out
        if self.lora_magnitude_vector is None:
            return out + self._lora_branch(x)
        return out + self._dora_branch(x, out)

    def _dora_branch(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output, term for term PEFT's `DoraLinearLayer.forward`."""
        a, b = self.lora_A.weight, self.lora_B.weight
        weight = self.weight.to(x.dtype)
        # the norm is a constant in backward (DoRA section 4.3): no graph through W + scaling B A
        with torch.no_grad():
            norm = dora_weight_norm(weight, self.scaling * (b @ a).to(x.dtype))
        factor = self.lora_magnitude_vector / norm
        if self.lora_dropout is not None and self.training:
            x = self.lora_dropout(x)
            base = frozen_linear(x, self.weight, None)  # the base applied to the dropped-out input, as PEFT does
        else:
            base = out if self.bias is None else out - self.bias
        lora = F.linear(F.linear(x, a), b) * self.scaling
        return (factor - 1) * base + factor * lora

    def to_base(self) -> nn.Linear:
        """A plain nn.Linear owning this layer's weight/bias Parameters (the adapter is dropped)."""
        return plain_linear(self)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.lora_extra_repr()}"


class LoraConv1D(_MatrixLora, Conv1D):
    """GPT-2's Conv1D (weight stored (in, out), i.e. PEFT's fan_in_fan_out) + LoRA."""

    def __init__(
        self,
        base: Conv1D,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ):
        check_hyper(r, alpha, dropout, init)
        self._build(base, r, alpha, dropout=dropout, use_rslora=use_rslora, init=init)

    def _build(
        self,
        base: Conv1D,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        generator: torch.Generator | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.nf, self.nx = base.nf, base.nx
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self._setup_lora(r, alpha, dropout, use_rslora, init)
        self._add_factors(self.nx, self.nf, base.weight)
        self._first_init(generator)
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
