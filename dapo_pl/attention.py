"""``dapo_sdpa``: transformers' ``sdpa`` attention, with grouped-query attention inside the kernel on CPU.

With a padding mask, transformers' ``sdpa`` attention copies every key/value head ``num_attention_heads /
num_key_value_heads`` times (``repeat_kv``) before calling ``scaled_dot_product_attention``, because on CUDA a
mask together with ``enable_gqa=True`` falls back to the slow math kernel. On CPU the fused kernel takes the
grouped heads and the mask as they are: no copy of the KV cache per layer and per generated token. Measured on
these 2-core machines (Qwen2, 6 query / 2 key-value heads, head dim 64, 128 rows): one decoding step's attention
4.6 ms -> 0.8 ms; forward + backward of a 38-token training batch 52 ms -> 31 ms per layer. Outputs are the
same up to float rounding.

Every other case (CUDA, no mask, no grouped heads, a position bias or a paged cache) goes to transformers' own
``sdpa`` function unchanged. The name is registered in transformers' attention and mask interfaces (the masks
are ``sdpa``'s), so a model loaded with ``attn_implementation="dapo_sdpa"`` uses it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

NAME = "dapo_sdpa"


def gqa_sdpa_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention of ``query`` over grouped ``key``/``value`` heads, masked, without repeating the heads.

    Shapes: ``query`` ``[B, H, Lq, D]``, ``key``/``value`` ``[B, Hkv, Lk, D]`` (``H`` a multiple of ``Hkv``),
    ``attention_mask`` ``[B, 1, Lq, Lk]`` (bool or additive) -> ``[B, Lq, H, D]``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = getattr(module, "num_key_value_groups", 1) > 1
    plain = kwargs.get("position_bias") is None and kwargs.get("cache") is None
    if query.device.type != "cpu" or attention_mask is None or not grouped or not plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
            **kwargs,
        )  # fmt: skip
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )  # [B, H, Lq, D]
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :data:`NAME` with transformers (idempotent); returns the name for ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, gqa_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def choose_implementation(requested: str | None, config: Any) -> str | None:
    """The ``attn_implementation`` to load a model with. ``requested`` wins (:data:`NAME` is registered first);
    None picks :data:`NAME` for models with grouped key/value heads (where it avoids the copies), else None
    (transformers' own default)."""
    if requested is not None:
        return register() if requested == NAME else requested
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv_heads, int) and 0 < kv_heads < heads:
        return register()
    return None
