"""LoRA on nn.Conv1d / nn.Conv2d / nn.Conv3d, PEFT's definition (peft.tuners.lora.layer Conv1d/Conv2d/Conv3d).

`lora_A` is a convolution with the layer's kernel, stride and padding from `in` channels to `r`, weight
(r, in, *kernel); `lora_B` a 1x1 convolution from `r` to `out`, weight (out, r, 1, ...). Their product is a
rank-r change of the kernel, `delta[o, i, ...] = scaling * sum_k B[o, k] A[k, i, ...]` (PEFT's `get_delta_weight`),
so the adapter merges into the layer's weight exactly. Keys are PEFT's `lora_A.weight` / `lora_B.weight`.

PEFT builds `lora_A` without the layer's dilation, groups or padding mode, so for a layer that has any of them the
adapter would not be a change of its kernel (PEFT cannot merge grouped ones, and computes a different convolution
for the others): `refusal` names such a layer and what is valid instead of training something PEFT reads otherwise.
Modalities' `ConvLoRA` (loralib's) factorises differently; docs/modalities.md says how.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the universal spelling
from torch import nn

from lorafit.lora.hyper import check_hyper
from lorafit.lora.layers import LoraLayer, LoraWeight, _new_param

VALID = "groups=1, dilation=1 and padding_mode='zeros'"


class _ConvLora(LoraLayer):
    """A/B as `lora_A`/`lora_B` convolution weights beside the frozen kernel (a mixin before the conv class)."""

    lora_A: LoraWeight  # noqa: N815 - PEFT's names, kept for identical state-dict keys
    lora_B: LoraWeight  # noqa: N815
    _conv_attrs = (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "transposed",
        "output_padding",
        "groups",
        "padding_mode",
        "_reversed_padding_repeated_twice",
    )

    def __init__(
        self,
        base: nn.Module,
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
        base: nn.Module,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        generator: torch.Generator | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not the conv's __init__: it would allocate a second weight
        for attr in self._conv_attrs:
            setattr(self, attr, getattr(base, attr))
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self._setup_lora(r, alpha, dropout, use_rslora, init)
        ones = (1,) * len(self.kernel_size)
        self.lora_A = LoraWeight(_new_param((self.r, self.in_channels, *self.kernel_size), base.weight))
        self.lora_B = LoraWeight(_new_param((self.out_channels, self.r, *ones), base.weight))
        self._first_init(generator)
        self.train(base.training)

    @staticmethod
    def refusal(base: nn.Module) -> str | None:
        """Why this convolution takes no adapter (PEFT's would not be a change of its kernel), or None."""
        reasons = []
        if base.groups != 1:
            reasons.append(
                f"groups={base.groups} (PEFT's adapter on it is an ungrouped convolution, which cannot be "
                "merged into the layer; PEFT refuses to merge it)"
            )
        if any(d != 1 for d in base.dilation):
            reasons.append(
                f"dilation={tuple(base.dilation)} (PEFT's lora_A ignores it, so the saved adapter would "
                "compute another convolution there)"
            )
        if base.padding_mode != "zeros":
            reasons.append(
                f"padding_mode='{base.padding_mode}' (PEFT's lora_A pads with zeros, so merging would "
                "change what the layer computes)"
            )
        return f"{'; '.join(reasons)}; LoRA on convolutions needs {VALID}" if reasons else None

    @property
    def feature_dims(self) -> tuple[int, int]:
        return self.in_channels, self.out_channels

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight, self.lora_B.weight

    def _delta_to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(self.weight.shape)  # (out, in * prod(kernel)) -> (out, in, *kernel)

    def _base_weight_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def _lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        # dropout on the adapter input only, as for linear layers (PEFT's definition)
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel_size) - 1]
        return conv(conv(x, self.lora_A.weight, None, self.stride, self.padding), self.lora_B.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(x, self.weight, self.bias)
        return out if self.merged else out + self._lora_branch(x)

    def to_base(self) -> nn.Module:
        """The plain convolution owning this layer's weight/bias Parameters (the adapter is dropped)."""
        base_cls = next(c for c in type(self).__mro__ if c in (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        with torch.device("meta"):
            plain = base_cls(
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                bias=False,
                padding_mode=self.padding_mode,
            )
        plain.weight = self.weight
        plain.register_parameter("bias", self.bias)
        return plain.train(self.training)

    def extra_repr(self) -> str:
        return f"{nn.modules.conv._ConvNd.extra_repr(self)}, {self.lora_extra_repr()}"


class LoraConv1d(_ConvLora, nn.Conv1d):
    """nn.Conv1d + LoRA (not GPT-2's Conv1D, which is a linear layer: LoraConv1D)."""

    base_kind = "Conv1d"


class LoraConv2d(_ConvLora, nn.Conv2d):
    """nn.Conv2d + LoRA."""

    base_kind = "Conv2d"


class LoraConv3d(_ConvLora, nn.Conv3d):
    """nn.Conv3d + LoRA."""

    base_kind = "Conv3d"
