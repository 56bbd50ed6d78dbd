"""Trunks and embedding heads for the main job.

Backbone specs (``--backbone``):

``mlp``
    a small MLP for feature vectors or tiny images (the digits default).
``cnn``
    a small CNN (3x3 convolutions, batch norm) suited to 8x8 digits and small images.
``identity``
    no trunk: the head trains on the inputs directly (``embeddings:PATH.npz``).
``timm:NAME``
    ``timm.create_model(NAME, num_classes=0)``; random weights unless local weights are given
    with ``pretrained`` (a file, or ``"cache"`` for timm's / Hugging Face's local cache). Nothing
    is downloaded at run time.

The embedder is :class:`EmbeddingHead`: optional pooling of feature maps (average or GeM,
as the MPA paper uses), a linear layer (``head="linear"``) or none (``head="none"``: the trunk's
pooled features are the embedding, e.g. a ViT's CLS token as DMCAC uses), then optional
LayerNorm (non-parametric, as in the adaptive-margin paper) and/or L2 normalisation.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .data import ImageTransforms, default_image_transforms

BUILTIN_BACKBONES = ("mlp", "cnn", "identity")
HEAD_NORMS = ("none", "l2", "layernorm", "layernorm+l2")
POOLINGS = ("avg", "gem")
HEADS = ("linear", "none")


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al.): ``(mean(x^p))^(1/p)`` over H, W; p=3 is "cubic GeM"."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = False):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p))) if learnable else float(p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class EmbeddingHead(nn.Module):
    """[pool] -> linear (or nothing, ``head="none"``) -> [LayerNorm without affine] -> [L2 normalise]."""

    def __init__(
        self,
        in_features: int,
        embedding_size: int,
        *,
        pooling: str = "avg",
        norm: str = "none",
        gem_p: float = 3.0,
        head: str = "linear",
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if head == "none" and int(embedding_size) != int(in_features):
            raise ValueError(
                f"head='none' uses the trunk's {in_features}-d features as the embedding: set "
                f"embedding_size={in_features} (got {embedding_size}), or use head='linear'"
            )
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if norm not in HEAD_NORMS:
            raise ValueError(f"head norm must be one of {HEAD_NORMS}, got {norm!r}")
        self.pooling, self.norm = pooling, norm
        self.gem = GeM(gem_p) if pooling == "gem" else None
        self.head = head
        self.fc = nn.Linear(in_features, embedding_size) if head == "linear" else nn.Identity()
        self.layernorm = nn.LayerNorm(embedding_size, elementwise_affine=False) if "layernorm" in norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # feature maps (B, C, H, W) from a trunk without global pooling
            x = self.gem(x.float()) if self.gem is not None else x.mean(dim=(-2, -1))
        elif x.dim() != 2:
            x = x.flatten(1)
        x = self.fc(x.float())
        if self.layernorm is not None:
            x = self.layernorm(x)
        if self.norm.endswith("l2"):
            x = nn.functional.normalize(x, dim=-1)
        return x


class MLPTrunk(nn.Module):
    """Flatten -> (Linear -> BatchNorm -> ReLU) x 2."""

    def __init__(self, in_features: int, hidden: int = 128):
        super().__init__()
        self.out_features = hidden
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks; returns the last feature map (the head pools it)."""

    def __init__(self, in_channels: int, width: int = 16):
        super().__init__()
        self.out_features = 4 * width

        def block(cin: int, cout: int) -> list:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.net = nn.Sequential(
            *block(in_channels, width), *block(width, 2 * width), nn.MaxPool2d(2), *block(2 * width, 4 * width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class Model:
    trunk: nn.Module
    embedder: nn.Module
    feature_size: int
    #: image transforms the data must use (timm's data config), None for built-in data shapes
    transforms: Optional[ImageTransforms]
    description: str


def parse_backbone(spec: str) -> tuple[str, Optional[str]]:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("backbone must be a non-empty string: mlp, cnn, identity or timm:NAME")
    kind, _, name = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "timm":
        if not name:
            raise ValueError("timm backbones are written 'timm:NAME', e.g. 'timm:resnet50'")
        return kind, name
    if kind in ("linear", "none"):
        kind = "identity"
    if kind in BUILTIN_BACKBONES and not name:
        return kind, None
    close = difflib.get_close_matches(kind, (*BUILTIN_BACKBONES, "timm"), n=2, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown backbone {spec!r}.{hint} Use mlp, cnn, identity or timm:NAME")


def build_model(
    backbone: str,
    *,
    embedding_size: int,
    input_shape: Optional[tuple],
    image_size: Optional[int] = None,
    pooling: str = "avg",
    head_norm: str = "none",
    pretrained: Optional[str] = None,
    gem_p: float = 3.0,
    head: str = "linear",
) -> Model:
    """Build trunk + embedder. ``input_shape`` is fixed by non-image data, None for image folders."""
    if int(embedding_size) < 1:
        raise ValueError(f"embedding size must be >= 1, got {embedding_size}")
    kind, name = parse_backbone(backbone)
    transforms = None
    if kind == "timm":
        trunk, features, transforms, desc = _timm_trunk(
            name, input_shape=input_shape, image_size=image_size, pooling=pooling, pretrained=pretrained
        )
    else:
        if pretrained:
            raise ValueError(f"--pretrained applies to timm backbones only, not {backbone!r}")
        if input_shape is None:  # an image dataset with a built-in backbone
            size = int(image_size or 32)
            input_shape = (3, size, size)
            transforms = default_image_transforms(size)
        if kind == "mlp":
            trunk = MLPTrunk(math.prod(input_shape))
            features, desc = trunk.out_features, f"MLP({math.prod(input_shape)}->128->128)"
        elif kind == "cnn":
            if len(input_shape) != 3:
                raise ValueError(
                    f"the cnn backbone needs image inputs (C, H, W), the data gives shape {input_shape}; "
                    f"use --backbone mlp or identity"
                )
            trunk = SmallCNN(input_shape[0])
            features, desc = trunk.out_features, f"SmallCNN({input_shape[0]}->16->32->64)"
        else:
            # the raw features, flattened: image-shaped data (digits is 1 x 12 x 12) must reach the
            # head as vectors, not as a feature map the head would pool to one value per channel
            trunk = nn.Flatten() if len(input_shape) > 1 else nn.Identity()
            features, desc = math.prod(input_shape), "identity"
    embedder = EmbeddingHead(features, int(embedding_size), pooling=pooling, norm=head_norm, gem_p=gem_p, head=head)
    layer = f"{features}->{embedding_size}" if head == "linear" else f"none: the trunk's {features}-d features"
    return Model(
        trunk=trunk,
        embedder=embedder,
        feature_size=features,
        transforms=transforms,
        description=f"{desc} + head({layer}, pool={pooling}, norm={head_norm})",
    )


def _timm_trunk(name: str, *, input_shape, image_size, pooling, pretrained):
    try:
        import timm
        from timm.data import create_transform, resolve_data_config
    except ImportError as exc:  # pragma: no cover - timm is in the [train] extra
        raise ImportError("timm backbones need timm: pip install 'pml-plugins[train]'") from exc
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown timm model {name!r}.{hint} See timm.list_models('{name[:4]}*')")
    if input_shape is not None and len(input_shape) != 3:
        raise ValueError(f"timm:{name} needs image data; this dataset gives feature vectors of shape {input_shape}")
    kwargs = {"num_classes": 0}
    if pooling == "gem":
        kwargs["global_pool"] = ""  # keep the feature map; the head applies GeM
    if input_shape is not None:
        kwargs["in_chans"] = input_shape[0]
    if image_size is not None or input_shape is not None:
        size = int(image_size or input_shape[-1])
        kwargs["img_size"] = size  # ViT-style models take it; others ignore it below
    model = _create_timm(timm, name, kwargs, pretrained)
    if pooling == "gem":
        probe_size = kwargs.get("img_size") or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        with torch.no_grad():
            was = model.training
            model.eval()
            out = model(torch.zeros(1, kwargs.get("in_chans", 3), probe_size, probe_size))
            model.train(was)
        if out.dim() != 4:
            raise ValueError(
                f"GeM pooling needs a CNN feature map; timm:{name} gives shape {tuple(out.shape)} "
                f"without pooling. Use --pooling avg"
            )
    transforms = None
    if input_shape is None:
        overrides = {"input_size": (3, int(image_size), int(image_size))} if image_size else {}
        config = resolve_data_config(overrides, model=model)
        transforms = ImageTransforms(
            train=create_transform(**config, is_training=True), test=create_transform(**config, is_training=False)
        )
    weights = "random init" if not pretrained else f"pretrained ({pretrained})"
    return model, model.num_features, transforms, f"timm:{name} [{weights}]"


def _create_timm(timm, name: str, kwargs: dict, pretrained: Optional[str]):
    def create(**extra):
        try:
            return timm.create_model(name, **kwargs, **extra)
        except TypeError as exc:
            if "img_size" in kwargs and "img_size" in str(exc):
                rest = {k: v for k, v in kwargs.items() if k != "img_size"}
                return timm.create_model(name, **rest, **extra)
            raise

    if not pretrained:
        return create(pretrained=False)
    if pretrained != "cache":
        path = os.path.expanduser(pretrained)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained weights file {path!r} does not exist")
        return create(pretrained=True, pretrained_cfg_overlay={"file": path})
    # Only what is already cached on disk: force the Hugging Face hub offline for this call.
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        return create(pretrained=True)
    except Exception as exc:
        raise FileNotFoundError(
            f"no local pretrained weights for timm:{name} (nothing is downloaded at run time): {type(exc).__name__}. "
            f"Download them once (e.g. timm.create_model({name!r}, pretrained=True) on a connected machine) "
            f"or pass --pretrained PATH to a .pth/.safetensors file"
        ) from None
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
