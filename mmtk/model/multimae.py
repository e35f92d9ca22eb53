"""The masked multi-modal ViT (MultiMAE) and its finetuning counterpart.

    inputs {rgb, depth, semseg}            prepared tensors, one per modality
      -> tokenizers (one per modality)     patch tokens + fixed sin-cos positions, one shared grid
      -> masking                           Dirichlet split of a visible-token budget over modalities
      -> encoder (ViT blocks)              visible tokens + learned global token(s), no final norm
      -> decoders (one per task)           cross-attention from task positions to visible tokens
      -> losses                            on hidden patches only, per sample, then batch mean

`MultiMAE` is the pretraining model; `DenseModel` reuses the encoder on every token of whatever
inputs are given and adds a dense head (ConvNeXt or DPT) for finetuning.
"""

from __future__ import annotations

import reprlib

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from mmtk.modality import Modality, get_modality
from mmtk.model.decoder import MaskedDecoder, TokenLayout, VisibleTokens
from mmtk.errors import MmtkError
from mmtk.model.heads import ConvNeXtHead, DPTHead
from mmtk.model.layers import Block, TimmBlock, layer_norm
from mmtk.model.masking import sample_masks


@dataclass
class ModelConfig:
    """Everything that defines a model's architecture and its pretraining objective."""

    # Encoder (ViT)
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: tuple[int, int] = (224, 224)  # sets the stored positional grid; other sizes interpolate
    num_global_tokens: int = 1
    drop_path_rate: float = 0.0
    # Modalities: names registered in mmtk.modality (the named models of mmtk.registry declare theirs)
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()  # pretraining targets; none: the encoder alone
    num_classes: int = 40  # classes of class-map modalities (input and output)
    # Pretraining decoders and objective
    decoder_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    num_visible: int = 98  # visible-token budget per sample, all modalities together
    alphas: float | dict[str, float] = 1.0  # Dirichlet concentration (one value or per modality)
    sample_subsets: bool = False  # first draw a non-empty subset of input modalities uniformly
    min_valid_fraction: float = 0.0  # tokens with fewer valid pixels (depth holes) are never visible
    loss_weights: dict[str, float] = field(default_factory=dict)  # per task, default 1
    fp32_decoders: tuple[str, ...] | None = None  # decoders run outside autocast; None: those whose adapter asks
    # Finetuning head (None: pretraining model with masked decoders)
    head: str | None = None  # "convnext" | "dpt"
    task: str | None = None  # what the head predicts: a modality with a metric family
    main_inputs: tuple[str, ...] = ()  # tokens the head reads; none given: the first input's
    convnext_dim: int = 6144  # ConvNeXt: values per token before un-patchifying
    convnext_depth: int = 4  # ConvNeXt blocks
    preds_per_patch: int = 16  # ConvNeXt: k*k pixels predicted per token
    hooks: tuple[int, ...] = (2, 5, 8, 11)  # DPT: 0-based encoder blocks read (blocks 3/6/9/12)
    layer_dims: tuple[int, ...] = (96, 192, 384, 768)  # DPT: widths of the reassembled maps
    dpt_dim: int = 256  # DPT: width of the fused feature maps
    output_norm: tuple[float, float] | None = None  # (mean, std): the head predicts (y - mean) / std, forward gives y

    def __post_init__(self) -> None:
        self.image_size = _pair(self.image_size)
        for name in ("inputs", "outputs", "main_inputs", "hooks", "layer_dims"):
            setattr(self, name, tuple(getattr(self, name)))
        if not self.inputs:
            raise MmtkError("a model needs at least one input modality: give inputs=(...), or a named model "
                            "(mmtk.list_models()), which declares its own")
        self.main_inputs = self.main_inputs or self.inputs[:1]
        concentrations = self.alphas.values() if isinstance(self.alphas, dict) else [self.alphas]
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and a > 0 for a in concentrations):
            raise MmtkError(f"alphas = {reprlib.repr(self.alphas)}: the Dirichlet concentration must be a positive "
                            f"number or a mapping of modality to positive number (the paper uses 1.0)")
        if not set(self.main_inputs) <= set(self.inputs):
            raise MmtkError(f"main_inputs {','.join(self.main_inputs)} are not all among the inputs "
                            f"{','.join(self.inputs)}; the head reads the tokens of main_inputs: name inputs there")
        if self.fp32_decoders is None:  # the adapters' choice (semseg: logits over many classes lose too much)
            self.fp32_decoders = tuple(name for name in self.outputs if get_modality(name).fp32_decoder)
        self.fp32_decoders = tuple(self.fp32_decoders)
        height, width = self.image_size
        if height < self.patch_size or width < self.patch_size:
            raise MmtkError(f"image size {height}x{width} px is smaller than one {self.patch_size} px patch; use at "
                            f"least {self.patch_size}x{self.patch_size} (data.image_size)")
        if self.image_size[0] % self.patch_size or self.image_size[1] % self.patch_size:
            raise MmtkError(f"image size {self.image_size} px is not divisible by the patch size "
                            f"{self.patch_size} px; pick a multiple of {self.patch_size}")
        if self.head is None and self.outputs and self.num_visible <= 0:  # a budget >= the tokens: masking.py
            raise MmtkError(f"num_visible {self.num_visible}: the encoder would see no token; give a visible budget "
                            f"of at least 1 (the paper: 98 of 3 x 196 tokens, a sixth)")

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    def alpha_of(self, name: str) -> float:
        return self.alphas.get(name, 1.0) if isinstance(self.alphas, dict) else float(self.alphas)


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def build_modality(name: str, config: ModelConfig) -> Modality:
    return get_modality(name)(patch_size=config.patch_size, num_classes=config.num_classes)


@dataclass
class EncoderFeatures:
    """Encoder output on all tokens of the given inputs (finetuning mode)."""

    tokens: Tensor  # [B, N + G, D] last block; input tokens in layout order, then global tokens
    layout: TokenLayout
    blocks: list[Tensor] | None = None  # every block's output, when asked for
    present: dict[str, Tensor] = field(default_factory=dict)  # input -> [B] bool, where some samples lack it

    def select(self, names: tuple[str, ...], tokens: Tensor | None = None) -> Tensor:
        """Concatenate the tokens of `names` along channels: [B, N_grid, D * len(names)].

        A name absent from the inputs is filled with the mean of the tokens of the present inputs,
        so a head trained on RGB tokens still runs when only depth is given; per sample when
        samples lack inputs (`present`).
        """
        tokens = self.tokens if tokens is None else tokens
        per_input = {name: tokens[:, s:e] for name, (s, e) in self.layout.spans.items()}
        if self.present:
            return torch.cat(self.per_sample_tokens(per_input, names), dim=-1)
        if any(name not in per_input for name in names):
            fallback = torch.stack(list(per_input.values())).mean(dim=0)
            per_input = {name: per_input.get(name, fallback) for name in names}
        return torch.cat([per_input[name] for name in names], dim=-1)

    def per_sample_tokens(self, per_input: dict[str, Tensor], names: tuple[str, ...]) -> list[Tensor]:
        """Tokens [B, N_grid, D] of each of `names`; where a sample lacks one, the mean of those it has."""
        first = next(iter(per_input.values()))
        everywhere = torch.ones(first.shape[0], dtype=first.dtype, device=first.device)
        has = {name: self.present[name].to(first) if name in self.present else everywhere for name in per_input}
        count = torch.stack(list(has.values())).sum(dim=0).clamp_min(1)  # [B] inputs each sample has
        fallback = sum(has[name][:, None, None] * tok for name, tok in per_input.items()) / count[:, None, None]
        return [torch.where(has[name][:, None, None] > 0, per_input[name], fallback) if name in per_input
                else fallback for name in names]


@dataclass
class MultiMAEOutput:
    """What a pretraining forward pass returns."""

    preds: dict[str, Tensor]  # task -> prediction in image layout
    losses: dict[str, Tensor]  # task -> scalar loss (tasks that had a target)
    loss: Tensor  # weighted sum of `losses`
    masks: dict[str, Tensor]  # input -> [B, N] bool, True = hidden


class MultiModalEncoder(nn.Module):
    """Tokenizers, learned global token(s) and the ViT blocks shared by all modalities."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.modalities = {name: build_modality(name, config) for name in config.inputs}
        self.tokenizers = nn.ModuleDict({name: m.tokenizer(config.dim, config.grid)
                                         for name, m in self.modalities.items()})
        self.global_tokens = nn.Parameter(torch.zeros(1, config.num_global_tokens, config.dim))
        drop_path = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]  # linear
        self.blocks = nn.ModuleList([
            Block(config.dim, config.num_heads, config.mlp_ratio, qkv_bias=True, drop_path=dp, norm_layer=layer_norm)
            for dp in drop_path
        ])
        trunc_normal_(self.global_tokens, std=0.02)

    def tokenize(self, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], TokenLayout]:
        """Tokens of every model input present in `inputs` ([B, N_m, D] each) and their layout."""
        tokens = {name: tok(inputs[name]) for name, tok in self.tokenizers.items() if name in inputs}
        if not tokens:
            raise MmtkError(f"none of the model's inputs {list(self.tokenizers)} is in the batch "
                            f"(got {sorted(inputs)}); pass at least one of them")
        some = next(iter(inputs[name] for name in tokens))
        stride = self.modalities[next(iter(tokens))].stride
        image_size = (some.shape[-2] * stride, some.shape[-1] * stride)
        grid = (image_size[0] // self.config.patch_size, image_size[1] // self.config.patch_size)
        spans, start = {}, 0
        for name, tok in tokens.items():
            if tok.shape[1] != grid[0] * grid[1]:
                raise MmtkError(f"input '{name}' gives {tok.shape[1]} tokens but the image grid is "
                                f"{grid[0]}x{grid[1]}; give every modality the same image size")
            spans[name] = (start, start + tok.shape[1])
            start += tok.shape[1]
        return tokens, TokenLayout(spans, grid, image_size)

    def forward(self, x: Tensor, key_mask: Tensor | None = None, return_all_blocks: bool = False
                ) -> tuple[Tensor, list[Tensor] | None]:
        """x: [B, N, D] tokens -> [B, N + G, D] (global tokens appended last)."""
        x = torch.cat([x, self.global_tokens.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
        attn_mask = None
        if key_mask is not None:
            keys = torch.cat([key_mask, key_mask.new_ones(x.shape[0], self.config.num_global_tokens)], dim=1)
            attn_mask = keys[:, None, None, :]  # [B, 1, 1, N + G]
        outputs = []
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
            if return_all_blocks:
                outputs.append(x)
        return x, (outputs if return_all_blocks else None)

    def forward_features(self, inputs: dict[str, Tensor], return_all_blocks: bool = False,
                         present: dict[str, Tensor] | None = None) -> EncoderFeatures:
        """Encode every token of the given inputs (no masking).

        `present`: optional [B] bool per input, False where a sample lacks it (a placeholder tensor):
        no other token attends to its tokens, so the sample is encoded as if it had not been given.
        """
        tokens, layout = self.tokenize(inputs)
        present = {name: has for name, has in (present or {}).items() if name in tokens}
        x = torch.cat(list(tokens.values()), dim=1)  # [B, N, D]
        key_mask = None
        if present:  # [B, N]: True for the tokens of the inputs each sample has
            everywhere = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            key_mask = torch.cat([present.get(name, everywhere).to(x.device)[:, None].expand(-1, t.shape[1])
                                  for name, t in tokens.items()], dim=1)
        x, blocks = self(x, key_mask, return_all_blocks)
        return EncoderFeatures(x, layout, blocks, present)


class MultiMAE(nn.Module):
    """Multi-modal multi-task masked autoencoder (pretraining model)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = MultiModalEncoder(config)
        self.tasks = {name: build_modality(name, config) for name in config.outputs}
        self.decoders = nn.ModuleDict({
            name: MaskedDecoder(name, task.out_channels, config.patch_size // task.stride, config.dim,
                                context_inputs=config.inputs, grid=config.grid, dim=config.decoder_dim,
                                depth=config.decoder_depth, num_heads=config.decoder_heads,
                                mlp_ratio=config.mlp_ratio, query_source=task.loss_mask_source)
            for name, task in self.tasks.items()
        })
        init_weights(self)

    def forward(self, inputs: dict[str, Tensor], masks: dict[str, Tensor] | None = None,
                valid: dict[str, Tensor] | None = None, present: dict[str, Tensor] | None = None) -> MultiMAEOutput:
        """Mask, encode, decode every task and compute the losses.

        Args:
            inputs: prepared tensors by modality (see README); entries that are not model inputs
                are used as targets only.
            masks: optional token masks per input modality, [B, N_m] (True or 1 = hidden). When
                given they replace sampling, for any batch size; samples may differ in how many
                tokens are visible.
            valid: optional [B, 1, H, W] bool maps of valid pixels by modality (e.g. depth's);
                invalid pixels never enter a loss and can be kept hidden (`min_valid_fraction`).
            present: optional [B] bool per modality: False where a sample lacks it (its tensor in
                `inputs` is then a placeholder). Such a sample gets no tokens of it (fully hidden, its
                visible budget goes to the modalities it has) and no loss on it. A modality not named
                here is present in every sample.
        """
        valid, present = valid or {}, present or {}
        if masks is None:
            return self.forward_sampled(inputs, valid, present)
        tokens, layout = self.encoder.tokenize(inputs)
        masks = self.check_masks(masks, tokens)
        masks = {name: hide_absent(mask, present.get(name)) for name, mask in masks.items()}
        return self.forward_masked(inputs, valid, tokens, layout, masks, None, present)

    def forward_sampled(self, inputs: dict[str, Tensor], valid: dict[str, Tensor],
                        present: dict[str, Tensor] | None = None) -> MultiMAEOutput:
        """The pretraining step's forward with sampled masks (what `compile_step` compiles).

        Every sample gets the same visible count, known from the config before the masks exist, so
        every shape is static and nothing is read back from the device (a budget at or above the token
        count is refused by the masking).
        """
        present = present or {}
        tokens, layout = self.encoder.tokenize(inputs)
        masks = self.sample_masks(tokens, inputs, valid, present)
        return self.forward_masked(inputs, valid, tokens, layout, masks, self.config.num_visible, present)

    def forward_masked(self, inputs: dict[str, Tensor], valid: dict[str, Tensor], tokens: dict[str, Tensor],
                       layout: TokenLayout, masks: dict[str, Tensor], num_visible: int | None,
                       present: dict[str, Tensor] | None = None) -> MultiMAEOutput:
        """Encode the visible tokens, decode every task, compute the losses (see `forward_encoder`)."""
        present = present or {}
        short = any(name in present for name in tokens)  # a sample lacking an input may see fewer tokens
        encoded, visible = self.forward_encoder(tokens, layout, masks, num_visible, short)
        preds = self.forward_decoder(encoded, visible)
        losses = self.forward_loss(preds, inputs, masks, valid, layout.grid, present)
        weights = self.config.loss_weights
        total = sum((weights.get(name, 1.0) * loss for name, loss in losses.items()), encoded.new_zeros(()))
        return MultiMAEOutput(preds, losses, total, masks)

    def forward_features(self, inputs: dict[str, Tensor], return_all_blocks: bool = False) -> EncoderFeatures:
        """Finetuning mode: encode every token of the given inputs."""
        return self.encoder.forward_features(inputs, return_all_blocks)

    def sample_masks(self, tokens: dict[str, Tensor], inputs: dict[str, Tensor], valid: dict[str, Tensor],
                     present: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        present = present or {}
        eligible = {name: self.eligible_tokens(name, inputs, valid, t) for name, t in tokens.items()}  # [B, N_m]
        for name, has in present.items():
            if name in eligible:  # a sample lacking the input has no eligible token: its budget goes elsewhere
                eligible[name] = eligible[name] & has.to(eligible[name].device)[:, None]
        alphas = {name: self.config.alpha_of(name) for name in tokens}
        return sample_masks(eligible, self.config.num_visible, alphas, self.config.sample_subsets)

    def eligible_tokens(self, name: str, inputs: dict[str, Tensor], valid: dict[str, Tensor], tokens: Tensor) -> Tensor:
        """[B, N] tokens allowed to be visible: those with enough valid pixels."""
        everything = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        pixels = self.encoder.modalities[name].valid_pixels(inputs, valid)
        if pixels is None or self.config.min_valid_fraction <= 0:
            return everything
        kernel = self.config.patch_size // self.encoder.modalities[name].stride
        fraction = F.avg_pool2d(pixels[:, None].float(), kernel).flatten(1)  # [B, N]
        return fraction >= self.config.min_valid_fraction

    @staticmethod
    def check_masks(masks: dict[str, Tensor], tokens: dict[str, Tensor]) -> dict[str, Tensor]:
        checked = {}
        for name, tok in tokens.items():
            if name not in masks:
                raise MmtkError(f"masks were given but not for input '{name}'; give one per input or none")
            mask = masks[name].to(device=tok.device).bool()
            if mask.shape != tok.shape[:2]:
                raise MmtkError(f"mask of '{name}' has shape {tuple(mask.shape)}, expected {tuple(tok.shape[:2])} "
                                f"[batch, tokens]")
            checked[name] = mask
        return checked

    def forward_encoder(self, tokens: dict[str, Tensor], layout: TokenLayout, masks: dict[str, Tensor],
                        num_visible: int | None = None, short: bool = False) -> tuple[Tensor, VisibleTokens]:
        """Encode the visible tokens: [B, Nv + G, D], padded when samples differ in count.

        `num_visible` is Nv when the caller knows it (sampled masks): shapes then follow from the
        config alone and nothing is read back from the device, so the step compiles as one graph.
        Samples can only fall short of it when depth holes make tokens ineligible
        (`min_valid_fraction`) or when `short` says some lack an input; a key mask then hides their
        padding slots. Without it (given masks),
        Nv is the largest count in the batch, read from the masks.
        """
        x = torch.cat(list(tokens.values()), dim=1)  # [B, N, D]
        hidden = torch.cat([masks[name] for name in tokens], dim=1)  # [B, N]
        ids_shuffle = torch.argsort(hidden.to(torch.uint8), dim=1, stable=True)  # visible first, in order
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        counts = (~hidden).sum(dim=1)  # [B]
        if num_visible is None:
            nv = int(counts.max())  # host syncs: given masks only
            padded = int(counts.min()) != nv
        else:
            nv, padded = num_visible, short or self.config.min_valid_fraction > 0
        ids_keep = ids_shuffle[:, :nv]
        key_mask = torch.arange(nv, device=x.device)[None, :] < counts[:, None] if padded else None
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, Nv, D]
        encoded, _ = self.encoder(x, key_mask)
        return encoded, VisibleTokens(layout, ids_keep, ids_restore, key_mask)

    def forward_decoder(self, encoded: Tensor, visible: VisibleTokens) -> dict[str, Tensor]:
        preds = {}
        for name, decoder in self.decoders.items():
            if name in self.config.fp32_decoders and torch.is_autocast_enabled(encoded.device.type):
                with torch.autocast(encoded.device.type, enabled=False):
                    preds[name] = decoder(encoded.float(), visible)
            else:
                preds[name] = decoder(encoded, visible)
        return preds

    def forward_loss(self, preds: dict[str, Tensor], inputs: dict[str, Tensor], masks: dict[str, Tensor],
                     valid: dict[str, Tensor], grid: tuple[int, int],
                     present: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Per task: loss on hidden (and valid) pixels of the samples that have its target, per sample
        normalised, batch mean."""
        present = present or {}
        losses = {}
        for name, task in self.tasks.items():
            target = task.target(inputs)
            if target is None:
                continue
            pred = preds[name]
            weight = hidden_pixels(masks.get(task.loss_mask_source), grid, pred)
            pixel_valid = task.valid_pixels(inputs, valid)
            if pixel_valid is not None:
                weight = weight & pixel_valid.to(weight.device)
            has_target = present.get(task.loss_mask_source)  # [B]; norm_rgb's target is rgb's
            if has_target is not None:
                weight = weight & has_target.to(weight.device)[:, None, None]
            losses[name] = masked_mean(task.pixel_loss(pred, target), weight)
        return losses


def hide_absent(mask: Tensor, present: Tensor | None) -> Tensor:
    """Token mask [B, N] (True = hidden) with every token of a sample that lacks the modality hidden.

    `present`: [B] bool, or None when every sample has it.
    """
    return mask if present is None else mask | ~present.to(mask.device)[:, None]


def hidden_pixels(mask: Tensor | None, grid: tuple[int, int], pred: Tensor) -> Tensor:
    """Upsample a token mask [B, N] to the pixels of `pred` [B, C, h, w]: [B, h, w] bool.

    A task whose mask source was not an input has every pixel hidden.
    """
    batch, height, width = pred.shape[0], pred.shape[-2], pred.shape[-1]
    if mask is None:
        return torch.ones(batch, height, width, dtype=torch.bool, device=pred.device)
    (gh, gw), ph, pw = grid, height // grid[0], width // grid[1]
    return mask.reshape(batch, gh, 1, gw, 1).expand(batch, gh, ph, gw, pw).reshape(batch, height, width)


def masked_mean(pixel_loss: Tensor, weight: Tensor) -> Tensor:
    """Mean of `pixel_loss` [B, h, w] over `weight` pixels per sample, then over samples that have any."""
    loss = torch.where(weight, pixel_loss, torch.zeros((), dtype=pixel_loss.dtype, device=pixel_loss.device))
    count = weight.flatten(1).sum(dim=1)  # [B]
    per_sample = loss.flatten(1).sum(dim=1) / count.clamp_min(1)
    has_any = (count > 0).to(per_sample.dtype)
    # No branch and no boolean indexing: nothing waits for the GPU; 0 (with a graph) when no sample has any.
    return (per_sample * has_any).sum() / has_any.sum().clamp_min(1)


class DenseModel(nn.Module):
    """Finetuning model: the MultiMAE encoder on all tokens of the given inputs plus a dense head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.head not in ("convnext", "dpt") or config.task is None:
            raise MmtkError(f"unknown finetuning head '{config.head}' (task '{config.task}'); "
                            "use head='convnext' or head='dpt' with a task")
        self.config = config
        self.encoder = MultiModalEncoder(config)
        self.task = build_modality(config.task, config)
        in_dim = config.dim * len(config.main_inputs)
        if config.head == "convnext":
            self.head = ConvNeXtHead(in_dim, self.task.out_channels, config.convnext_dim, config.preds_per_patch,
                                     config.convnext_depth)
        else:
            if len(config.hooks) != 4 or max(config.hooks) >= config.depth:
                raise MmtkError(f"DPT needs 4 hooks among the {config.depth} encoder blocks, got {config.hooks}")
            self.head = DPTHead(in_dim, self.task.out_channels, config.hooks, config.layer_dims, config.dpt_dim)
        init_weights(self)

    def forward(self, inputs: dict[str, Tensor], present: dict[str, Tensor] | None = None) -> Tensor:
        """Prediction at full image resolution: semseg logits [B, C, H, W] or depth [B, 1, H, W] (in the task's
        units also when the head predicts normalised values, ``config.output_norm``).

        `present`: optional [B] bool per input, False where a sample lacks it (see `forward_features`).
        """
        features = self.forward_features(inputs, isinstance(self.head, DPTHead), present)
        if isinstance(self.head, DPTHead):
            hooked = [features.select(self.config.main_inputs, features.blocks[i]) for i in self.head.hooks]
            pred = self.head(hooked, features.layout.grid)
        else:
            pred = self.head(features.select(self.config.main_inputs), features.layout.grid,
                             features.layout.image_size)
        if self.config.output_norm is None:
            return pred
        mean, std = self.config.output_norm
        return pred * std + mean

    def forward_features(self, inputs: dict[str, Tensor], return_all_blocks: bool = False,
                         present: dict[str, Tensor] | None = None) -> EncoderFeatures:
        return self.encoder.forward_features(inputs, return_all_blocks, present)


def compile_blocks(model: nn.Module) -> nn.Module:
    """`torch.compile` every transformer block in place and return the model.

    With the default masking the visible-token budget is exact, so blocks see fixed shapes, compile once and
    fuse norms, activations and residuals around the matmuls (another token count, e.g. from depth holes or
    given masks, compiles once more). Masking, gathers and losses stay eager, which avoids the recompilations
    a whole-model compile suffers from data-dependent token counts.
    """
    for module in model.modules():
        if isinstance(module, TimmBlock):
            module.compile()
    return model


def compile_step(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> nn.Module:
    """`torch.compile` the pretraining step's forward in place and return the model (`train.compile: step`).

    For `MultiMAE`, `forward_sampled` (the forward with sampled masks) is compiled: tokenizers, masking,
    encoder, every decoder and the losses become one graph (`fullgraph=True`: a graph break is an error, not
    a silent split), and `loss.backward()` runs the backward graph AOTAutograd compiled with it. Sampled masks
    have the exact visible budget, so every shape follows from the config and nothing in the step reads a
    value back from the device. Given masks (`model(inputs, masks=...)`), whose counts may differ per sample,
    take the eager padded path. Other models compile their whole forward. In place, so parameter names and
    checkpoints are those of the eager model, and DDP can wrap it. `mode="reduce-overhead"` adds CUDA graphs.
    """
    options = dict(fullgraph=True, dynamic=False, backend=backend, mode=mode)
    if isinstance(model, MultiMAE):
        model.forward_sampled = torch.compile(model.forward_sampled, **options)
    else:
        model.compile(**options)
    return model


def init_weights(model: nn.Module) -> None:
    """MAE/MultiMAE-style init: xavier-uniform linears (q, k, v as separate matrices), zero biases."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            fan_out, fan_in = module.weight.shape
            splits = 3 if name.endswith("qkv") else 2 if name.endswith(".kv") else 1
            bound = (6.0 / (fan_in + fan_out // splits)) ** 0.5
            nn.init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d) and name.startswith("encoder.tokenizers.") and name.endswith(".proj"):
            nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
