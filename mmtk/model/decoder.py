"""MultiMAE's task decoder: cross-attention from a task's positions to the visible tokens.

Per output task (MultiMAE, Sec. 3.3):
  1. project encoder tokens to the decoder width; put them back on the full token grid with a
     learned mask token at every hidden position; add per-input task embeddings and sin-cos positions;
  2. queries: the task's own positions of that grid when the task is an input (a target-only task
     such as norm_rgb uses its source input, rgb), else mask tokens with positions; context: the visible tokens plus the global token(s);
  3. cross-attention (its output replaces the queries: no residual), MLP with residual,
     a few self-attention blocks, and a linear layer un-patchified to image layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn

from mmtk.model.layers import Block, CrossAttention, layer_norm, pos_embed_tokens, sincos_pos_embed_2d


@dataclass
class TokenLayout:
    """Where each input modality's tokens sit in the concatenated sequence of all input tokens."""

    spans: dict[str, tuple[int, int]]  # name -> (start, end)
    grid: tuple[int, int]  # tokens per column and per row of every modality
    image_size: tuple[int, int]  # pixels (H, W)

    @property
    def num_tokens(self) -> int:
        return max((end for _, end in self.spans.values()), default=0)


@dataclass
class VisibleTokens:
    """Which tokens the encoder saw: gather/scatter indices into the full token sequence."""

    layout: TokenLayout
    ids_keep: Tensor  # [B, Nv] positions (in the full sequence) of the encoded tokens
    ids_restore: Tensor  # [B, N] inverse permutation: full position -> slot in [visible, hidden]
    key_mask: Tensor | None  # [B, Nv] True for real visible tokens; None when no sample is padded

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]


class MaskedDecoder(nn.Module):
    """Decoder of one task (official name: SpatialOutputAdapter); see the module docstring."""

    def __init__(self, task: str, out_channels: int, patch_pixels: int, encoder_dim: int,
                 context_inputs: tuple[str, ...], grid: tuple[int, int], dim: int = 256,
                 depth: int = 2, num_heads: int = 8, mlp_ratio: float = 4.0, query_source: str | None = None) -> None:
        super().__init__()
        self.task = task
        self.query_source = query_source or task  # the input whose positions give the queries (norm_rgb: rgb)
        self.out_channels = out_channels
        self.patch_pixels = patch_pixels  # output pixels per token side (16, or 4 at 1/4 resolution)
        self.proj_context = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.task_embeddings = nn.ParameterDict({name: nn.Parameter(torch.zeros(1, 1, dim)) for name in context_inputs})
        self.register_buffer("pos_emb", sincos_pos_embed_2d(grid, dim))
        self.query_norm = layer_norm(dim)
        self.context_norm = layer_norm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.out_norm = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=layer_norm)
                                      for _ in range(depth)])
        self.out_proj = nn.Linear(dim, out_channels * patch_pixels**2)
        for token in [self.mask_token, *self.task_embeddings.values()]:
            trunc_normal_(token, std=0.02)

    pos_mode = "bilinear"  # how the positional grid is interpolated to other image sizes

    def positions(self, grid: tuple[int, int]) -> Tensor:
        return pos_embed_tokens(self.pos_emb, grid, self.pos_mode)  # [1, N_grid, d]

    def context_embeddings(self, layout: TokenLayout) -> Tensor:
        """Task embedding + position of every input token: [1, N, d] (every model input has a task embedding)."""
        pos = self.positions(layout.grid)
        return torch.cat([self.task_embeddings[name] + pos for name in layout.spans], dim=1)

    def queries_from_mask_token(self, batch: int, grid: tuple[int, int]) -> Tensor:
        queries = self.mask_token + self.positions(grid)
        if self.query_source in self.task_embeddings:
            queries = queries + self.task_embeddings[self.query_source]
        return queries.expand(batch, -1, -1)

    def forward(self, encoded: Tensor, visible: VisibleTokens) -> Tensor:
        """encoded: [B, Nv + G, D] encoder output (visible tokens, then global tokens)."""
        layout, nv = visible.layout, visible.num_visible
        batch = encoded.shape[0]
        context = self.proj_context(encoded)  # [B, Nv + G, d]
        dim = context.shape[-1]
        mask_token = self.mask_token.to(context.dtype)
        tokens, global_tokens = context[:, :nv], context[:, nv:]
        if visible.key_mask is not None:  # padding slots of samples with fewer visible tokens
            tokens = torch.where(visible.key_mask[..., None], tokens, mask_token)

        # Back on the full grid: visible tokens where they were, the mask token elsewhere.
        full = torch.cat([tokens, mask_token.expand(batch, layout.num_tokens - nv, dim)], dim=1)
        full = torch.gather(full, 1, visible.ids_restore[..., None].expand(-1, -1, dim))  # [B, N, d]
        full = full + self.context_embeddings(layout)

        if self.query_source in layout.spans:
            start, end = layout.spans[self.query_source]
            queries = full[:, start:end]  # [B, N_task, d]
        else:
            queries = self.queries_from_mask_token(batch, layout.grid).to(full.dtype)
        context = torch.gather(full, 1, visible.ids_keep[..., None].expand(-1, -1, dim))
        context = torch.cat([context, global_tokens], dim=1)  # [B, Nv + G, d]
        key_mask = None
        if visible.key_mask is not None:
            key_mask = torch.cat([visible.key_mask, visible.key_mask.new_ones(batch, global_tokens.shape[1])], dim=1)

        x = self.cross_attn(self.query_norm(queries), self.context_norm(context), key_mask)
        x = x + self.mlp(self.out_norm(x))
        x = self.blocks(x)
        x = self.out_proj(x)  # [B, N_task, C * p * p]
        grid_h, grid_w = layout.grid
        return rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=grid_h, w=grid_w,
                         p=self.patch_pixels, q=self.patch_pixels)
