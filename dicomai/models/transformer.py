"""DenseNet-121 features read as tokens by a small Transformer encoder, attention retrievable."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dicomai.models.backbones import densenet_backbone, densenet_width


class AttentionEncoderLayer(nn.Module):
    """A pre-norm Transformer encoder layer (MHSA, then a GELU feed-forward), batch first.

    `torch.nn.TransformerEncoderLayer` computes its attention without returning the weights;
    this one keeps the last forward's weights, averaged over heads, when `keep_attention` is
    set, so the model can show where its class token looked.
    """

    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.feed_forward = nn.Sequential(
            nn.Linear(d_model, ffn),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn, d_model),
        )
        self.dropout = nn.Dropout(dropout)
        self.keep_attention = False
        self.last_attention: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(tokens)
        attended, weights = self.attention(
            normed, normed, normed, need_weights=self.keep_attention, average_attn_weights=True
        )
        self.last_attention = weights.detach() if weights is not None else None
        tokens = tokens + self.dropout(attended)
        return tokens + self.dropout(self.feed_forward(self.norm2(tokens)))


class DenseNetTransformer(nn.Module):
    """The CNN-Transformer hybrid of the model documents.

    DenseNet-121's final map (7x7x1024 at 224²) becomes 49 tokens, linearly projected to
    `d_model`; a learnable class token and learnable positional encodings are added (the
    spatial ones on a 2-D grid, resized when the input gives another grid); `layers` encoder
    layers follow; the head reads the class token concatenated with the mean of the spatial
    tokens.

    Parameters
    ----------
    num_classes
        Outputs of the head.
    d_model, heads, ffn, layers
        Transformer width, attention heads, feed-forward width and depth.
    dropout
        Dropout in the encoder layers and before the head.
    frozen_blocks
        Freeze the stem and the first k (0-4) dense blocks with their transitions: for
        fine-tuning pretrained (e.g. CheXNet) weights on a small data set.
    tiny
        A small DenseNet (`dicomai.models.backbones`) for tests and demos.

    Grad-CAM explains the DenseNet features (``densenet.features.norm5``, their last layer);
    `attention_maps` gives the class token's attention over the grid from the last layer. Its
    heat maps are Grad-CAM++'s unless the package says otherwise (`explanation_method`).
    """

    gradcam_target_layer = "densenet.features.norm5"
    # Grad-CAM weighs each channel by its gradient averaged over the grid, which assumes the head
    # pools the map evenly; the class token's attention does not, and on some trained networks
    # the average points away from the finding. Nine small networks trained on painted nodules
    # (from scratch and on a frozen trained DenseNet, seeds 0-3, one and two threads): Grad-CAM's
    # maximum fell inside the nodule on 0.0-1.0 of the images (mean 0.48), Grad-CAM++'s on
    # 0.53-1.0 (mean 0.83). LayerCAM weighs each position by its own positive gradients: on the
    # four small networks of stop 21 that learnt the nodule (seeds 0-2, one and two threads)
    # 0.90-0.98, where Grad-CAM++ gave 0.63-0.93 and Grad-CAM 0.20-0.63.
    explanation_method = "layercam"
    # New on a pretrained DenseNet, so trained by the "frozen" strategy and the first stage of
    # "two-stage" too (the whole Transformer stayed at its random initial values).
    head_modules = (
        "tokens", "class_token", "class_position", "positions", "encoder", "norm", "head",
    )  # fmt: skip

    def __init__(
        self,
        num_classes: int,
        d_model: int = 256,
        heads: int = 8,
        ffn: int = 512,
        layers: int = 2,
        dropout: float = 0.1,
        frozen_blocks: int = 0,
        tiny: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= frozen_blocks <= 4:
            raise TypeError(f"frozen_blocks must be 0 to 4, got {frozen_blocks}")
        if layers < 1:
            # Built, then inference failed on the last layer's attention it reads.
            raise ValueError(f"layers must be at least 1, got {layers}")
        self.densenet = densenet_backbone(tiny)
        self.densenet.classifier = nn.Identity()
        self.tokens = nn.Linear(densenet_width(self.densenet), d_model)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d_model))
        grid = 16 if tiny else 7
        self.class_position = nn.Parameter(torch.zeros(1, 1, d_model))
        self.positions = nn.Parameter(torch.zeros(1, d_model, grid, grid))
        nn.init.trunc_normal_(self.positions, std=0.02)
        nn.init.trunc_normal_(self.class_token, std=0.02)
        self.encoder = nn.ModuleList(
            AttentionEncoderLayer(d_model, heads, ffn, dropout) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * d_model, num_classes))
        self._freeze(frozen_blocks)

    def _freeze(self, blocks: int) -> None:
        if blocks == 0:
            return
        features = self.densenet.features
        names = ["conv0", "norm0", "relu0", "pool0"]
        for index in range(1, blocks + 1):
            names += [f"denseblock{index}", f"transition{index}"]
        for name in names:
            module = getattr(features, name, None)
            if module is not None:
                for parameter in module.parameters():
                    parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self._encode(x)
        return self._classify(tokens)

    def _classify(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1))

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        feature_map = F.relu(self.densenet.features(x))
        rows, cols = feature_map.shape[-2:]
        tokens = self.tokens(feature_map.flatten(2).transpose(1, 2))
        positions: torch.Tensor = self.positions
        if positions.shape[-2:] != (rows, cols):
            positions = F.interpolate(positions, size=(rows, cols), mode="bilinear")
        tokens = tokens + positions.flatten(2).transpose(1, 2)
        start = (self.class_token + self.class_position).expand(len(x), -1, -1)
        tokens = torch.cat([start, tokens], dim=1)
        for layer in self.encoder:
            tokens = layer(tokens)
        return self.norm(tokens), (rows, cols)

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's class-token attention over the feature grid, averaged over heads.

        Parameters
        ----------
        x
            Input batch (N, 3, H, W).

        Returns
        -------
        torch.Tensor
            (N, rows, cols) weights of the grid tokens (7x7 at 224²); each map sums to at most
            one (the rest went to the class token itself).
        """
        with torch.no_grad():
            return self._attending(x)[1]

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Class logits and ``{"attention": the class token's attention}`` from one pass.

        The attention (`attention_maps`) is upsampled to the input size and scaled to max 1.
        """
        logits, grid = self._attending(x)
        maps = F.interpolate(grid[:, None], size=x.shape[-2:], mode="bilinear")[:, 0]
        peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)
        return logits, {"attention": (maps / peak[:, None, None]).clamp(0.0, 1.0)}

    def _attending(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the last layer's class-token attention (N, rows, cols), one pass."""
        last = self.encoder[-1]
        assert isinstance(last, AttentionEncoderLayer)
        last.keep_attention = True
        try:
            tokens, (rows, cols) = self._encode(x)
            weights = last.last_attention
        finally:
            last.keep_attention = False
            last.last_attention = None
        assert weights is not None
        return self._classify(tokens), weights[:, 0, 1:].reshape(len(x), rows, cols)
