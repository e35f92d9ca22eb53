"""Building blocks shared by tokenizers and decoders.

The transformer block, MLP and DropPath come from timm (weight init is mmtk.model.multimae.init_weights);
what timm does not have is here: fixed 2D sin-cos positional embeddings, the patch tokenizer that uses them, the
cross-attention of MultiMAE's decoders, and the attention kernel choice both attentions share.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock
from torch import Tensor, nn

from mmtk.errors import MmtkError

LAYER_NORM_EPS = 1e-6


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for [B, heads, N, d] tensors; `attn_mask` True = may attend.

    `scaled_dot_product_attention` everywhere except bf16 on the CPU, where its fused kernels are
    2-3x slower than two batched bf16 matmuls around an fp32 softmax (measured at MultiMAE's sizes).
    """
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, h, N, M]
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


class SelfAttention(TimmAttention):
    """timm's multi-head self-attention (same parameters: fused qkv, proj) on :func:`attention`."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if is_causal:  # (in timm's signature; MultiMAE never masks causally)
            raise NotImplementedError("causal attention is not supported")
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads).unbind(0)
        out = attention(q, k, v, attn_mask)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


# The pre-norm ViT block: timm's, with its attention layer injected.
Block = partial(TimmBlock, attn_layer=SelfAttention)


def layer_norm(dim: int, **kwargs) -> nn.LayerNorm:
    """The LayerNorm used everywhere in MultiMAE (eps 1e-6); kwargs as nn.LayerNorm's (device, dtype)."""
    return nn.LayerNorm(dim, eps=LAYER_NORM_EPS, **kwargs)


def sincos_pos_embed_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2D sin-cos positional embedding as a feature map: [1, dim, grid_h, grid_w].

    Channels are four blocks of dim/4: sin(row), cos(row), sin(col), cos(col), with the
    frequencies 1 / temperature**(k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos positional embeddings need a width divisible by 4, got {dim}")
    grid_h, grid_w = grid
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    rows = torch.arange(grid_h, dtype=torch.float64)[:, None] * omega  # [gh, D/4]
    cols = torch.arange(grid_w, dtype=torch.float64)[:, None] * omega  # [gw, D/4]
    rows = rows[:, None, :].expand(grid_h, grid_w, quarter)
    cols = cols[None, :, :].expand(grid_h, grid_w, quarter)
    emb = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=-1)  # [gh, gw, D]
    return emb.permute(2, 0, 1).unsqueeze(0).float()


def resize_pos_embed(pos: Tensor, grid: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """Interpolate a [1, D, h, w] positional embedding to `grid` (no-op when it already fits)."""
    if tuple(pos.shape[-2:]) == tuple(grid):
        return pos
    return F.interpolate(pos, size=grid, mode=mode, align_corners=False)


def pos_embed_tokens(pos: Tensor, grid: tuple[int, int], mode: str) -> Tensor:
    """Resize a [1, D, h, w] embedding to `grid` and flatten it row-major to tokens [1, N, D]."""
    return rearrange(resize_pos_embed(pos, grid, mode), "b d h w -> b (h w) d")


class PatchTokenizer(nn.Module):
    """Cut a dense [B, C, H, W] map into patch tokens [B, N, D] with fixed sin-cos positions.

    `stride` is the resolution of the input relative to the image (4 for maps at 1/4 resolution),
    so the kernel covers patch_size/stride pixels and every modality shares one token grid.
    `pos_mode` is how the stored positional grid is interpolated to other image sizes.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, grid: tuple[int, int],
                 stride: int = 1, pos_mode: str = "bicubic") -> None:
        super().__init__()
        kernel = max(1, patch_size // stride)
        self.pos_mode = pos_mode
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=kernel, stride=kernel)
        self.register_buffer("pos_emb", sincos_pos_embed_2d(grid, dim))

    def forward(self, x: Tensor) -> Tensor:
        k = self.proj.kernel_size[0]
        if x.shape[-2] % k or x.shape[-1] % k:
            raise MmtkError(f"an input of {x.shape[-2]}x{x.shape[-1]} px does not split into {k}x{k} patches; "
                            f"resize or crop it to a multiple of {k}")
        grid = (x.shape[-2] // k, x.shape[-1] // k)
        # The strided convolution written as one matmul over flattened patches: same weights, same result,
        # and much faster than cuDNN's strided-conv kernels (forward and backward) on a GPU.
        patches = rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=k, p2=k)  # [B, N, C*k*k]
        tokens = F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # [B, N, D]
        return tokens + pos_embed_tokens(self.pos_emb, grid, self.pos_mode)


class CrossAttention(nn.Module):
    """Multi-head attention of queries [B, Nq, D] to a context [B, Nc, D] (separate q and kv)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """`key_mask`: [B, Nc] bool, True for context tokens that may be attended to."""
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.kv(context), "b m (two h d) -> two b h m d", two=2, h=self.num_heads)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = attention(q, k, v, attn_mask)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class ClassMapTokenizer(PatchTokenizer):
    """Tokens of a class-index map (semantic segmentation): a class embedding, then patches of the embedded map.

    labels [B, h, w] (``ignore_index`` = unlabelled, embedded as zeros) -> tokens [B, gh*gw, dim].
    """

    def __init__(self, num_classes: int, embed_dim: int, dim: int, patch_size: int, grid: tuple[int, int],
                 ignore_index: int, stride: int = 1, pos_mode: str = "bicubic") -> None:
        super().__init__(embed_dim, dim, patch_size, grid, stride=stride, pos_mode=pos_mode)
        self.class_emb = nn.Embedding(num_classes, embed_dim)
        self.ignore_index = ignore_index

    def forward(self, labels: Tensor) -> Tensor:
        known = labels != self.ignore_index  # labels: [B, h, w]
        emb = self.class_emb(labels.clamp(0, self.class_emb.num_embeddings - 1))  # [B, h, w, embed_dim]
        emb = emb * known.unsqueeze(-1).to(emb.dtype)
        return super().forward(emb.permute(0, 3, 1, 2))
