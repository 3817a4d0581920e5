"""SEJE image side: CNN backbones, the visual embedding head and the image-category vector.

Paper: Xie, Liu et al., SEJE, ACM TOIS 40(4), 2022, arXiv 2110.11592 (code: git-disl/SEJE).
Backbones: He et al., ResNet, arXiv 1512.03385; Xie et al., ResNeXt, arXiv 1611.05431;
Zagoruyko & Komodakis, Wide ResNet, arXiv 1605.07146 (all from torchvision). Spec ``seje.md``
§2.1 (visual embedding), §1.4 and D5 (f_cat), §8.5 (offline by default).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

TORCHVISION_BACKBONES = ("resnet50", "resnext101_32x8d", "wide_resnet50_2")
BACKBONES = (*TORCHVISION_BACKBONES, "small_cnn")


class SmallCNN(nn.Module):
    """Four stride-2 conv-BN-ReLU stages and a global average pool, for CPU demos and tests.

    Not in the paper: torchvision has no reduced-width ResNet, so the CPU experiment uses this.
    Output width is ``8 * width``.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = chans[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


def _strip_prefix(state: dict, prefixes: tuple[str, ...] = ("module.", "model.")) -> dict:
    out = {}
    for k, v in state.items():
        for p in prefixes:  # DataParallel / wrapper prefixes (spec §8.6)
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def load_state_file(path: str | Path) -> dict:
    """A state dict from a local file, loaded with ``weights_only=True``.

    Accepts a bare state dict or a dict with a ``state_dict`` / ``model`` entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return _strip_prefix(obj)


def _torchvision_pretrained_state(name: str) -> dict:
    """ImageNet weights from the torch hub cache only; never downloads (spec §8.5)."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        raise FileNotFoundError(
            f"pretrained {name} weights not cached at {cached}; copy {Path(weights.url).name} "
            f"there (or set TORCH_HOME), or pass a local file as model.net.image_weights; "
            "nothing is downloaded"
        )
    return torch.load(cached, map_location="cpu", weights_only=True)


def build_backbone(
    name: str,
    weights: str | None = None,
    pretrained: bool = False,
    width: int = 32,
    num_classes: int | None = None,
) -> tuple[nn.Module, int]:
    """An image CNN without its classifier (or with a ``num_classes`` head); random init.

    Args:
        name: One of :data:`BACKBONES`.
        weights: Local state-dict file to load (the classifier head, if any, is skipped).
        pretrained: Load torchvision's ImageNet V1 weights from the hub cache (error if absent).
        width: ``small_cnn`` base width.
        num_classes: Keep a classification head with this many outputs (image classifier).

    Returns:
        ``(module, feature_dim)``; without ``num_classes`` the module returns pooled features.
    """
    if name not in BACKBONES:
        raise ValueError(f"image_encoder must be one of {BACKBONES}, got {name!r}")
    if name == "small_cnn":
        if pretrained:
            raise ValueError("image_encoder=small_cnn has no pretrained weights")
        net: nn.Module = SmallCNN(width)
        dim = net.out_dim
        if num_classes is not None:
            net = nn.Sequential(net, nn.Linear(dim, num_classes))
    else:
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        dim = net.fc.in_features
        net.fc = nn.Linear(dim, num_classes) if num_classes is not None else nn.Identity()
    load_backbone_weights(net, name, weights, pretrained, keep_head=num_classes is not None)
    return net, dim


def load_backbone_weights(
    net: nn.Module,
    name: str,
    weights: str | None = None,
    pretrained: bool = False,
    keep_head: bool = False,
) -> bool:
    """Load a local state-dict file, or cached ImageNet weights, into a backbone.

    Returns True when something was loaded. A missing cache or a mismatching file raises.
    """
    if name == "small_cnn" and pretrained and not weights:
        raise ValueError("image_encoder=small_cnn has no pretrained weights")
    if weights:
        state = load_state_file(weights)
    elif pretrained:
        state = _torchvision_pretrained_state(name)
    else:
        return False
    if not keep_head:  # a feature extractor: drop any classification head
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    src = weights or f"pretrained {name}"
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{src} does not fit {name}: {str(e).splitlines()[-1]}") from None
    if missing or unexpected:
        raise ValueError(
            f"{src} does not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return True


class ImageEncoder(nn.Module):
    """CNN features (+ f_cat) -> Linear -> BatchNorm1d -> LeakyReLU(0.02) -> L2 norm (§2.1).

    Args:
        backbone: Name in :data:`BACKBONES`.
        embed_dim: Joint-space size (1024).
        cat_dim: Width of the image-category vector f_cat appended to the CNN features
            (300, the word2vec size; kept even when f_cat is off so checkpoints stay compatible).
        weights / pretrained / width: See :func:`build_backbone`; the weights are loaded by
            :meth:`load_weights` (the LightningModule calls it when fitting starts).
        freeze_backbone: Keep the CNN fixed (D7; the paper fine-tunes from step 0).
    """

    def __init__(
        self,
        backbone: str = "resnext101_32x8d",
        embed_dim: int = 1024,
        cat_dim: int = 300,
        weights: str | None = None,
        pretrained: bool = False,
        width: int = 32,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        # weights are loaded by load_weights() (training start), not here: a checkpoint being
        # restored or evaluated must not need the ImageNet file
        self.cnn, self.feat_dim = build_backbone(backbone, width=width)
        self.backbone, self.weights, self.pretrained = backbone, weights, pretrained
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.cnn.requires_grad_(False)
        self.cat_dim = cat_dim
        self.head = nn.Sequential(
            nn.Linear(self.feat_dim + cat_dim, embed_dim),
            nn.BatchNorm1d(embed_dim),
            nn.LeakyReLU(0.02),
        )

    def load_weights(self) -> bool:
        """Load ``weights`` / ``pretrained`` into the CNN; True when something was loaded."""
        return load_backbone_weights(self.cnn, self.backbone, self.weights, self.pretrained)

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        if self.freeze_backbone:
            self.cnn.eval()  # frozen BatchNorm statistics too
        return self

    def forward(self, image: Tensor, f_cat: Tensor | None = None) -> Tensor:
        h = self.cnn(image)
        if f_cat is None:
            f_cat = h.new_zeros(h.shape[0], self.cat_dim)
        h = torch.cat([h, f_cat.to(h.dtype)], 1)
        return nn.functional.normalize(self.head(h).float(), dim=1)


class ImageCategoryVector(nn.Module):
    """f_cat: the word vector of the food class a frozen image classifier predicts (§1.4, D5).

    The classifier (e.g. a WideResNet-50 trained on Food-101) predicts one top-1 class per
    image; its name is embedded with the shared word embedding, as the mean of the vectors of
    its tokens (the whole underscore phrase when the vocabulary has it, else its parts).

    Args:
        arch: Classifier architecture (any of :data:`BACKBONES`).
        num_image_classes: Classifier outputs (101 for Food-101).
        class_tokens: ``(C, T)`` word ids of each class name, 0-padded.
        width: ``small_cnn`` width.
    """

    def __init__(
        self, arch: str, num_image_classes: int, class_tokens: Tensor, width: int = 32
    ) -> None:
        super().__init__()
        self.classifier, _ = build_backbone(arch, width=width, num_classes=num_image_classes)
        self.classifier.requires_grad_(False)
        self.register_buffer("class_tokens", class_tokens.long())

    def train(self, mode: bool = True) -> ImageCategoryVector:
        super().train(mode)
        self.classifier.eval()  # always a fixed feature extractor
        return self

    @torch.no_grad()
    def forward(self, image: Tensor, embedding: nn.Embedding) -> Tensor:
        pred = self.classifier(image).argmax(1)
        tokens = self.class_tokens[pred]
        vecs = embedding(tokens).detach()
        mask = (tokens > 0).unsqueeze(-1).to(vecs.dtype)
        return (vecs * mask).sum(1) / mask.sum(1).clamp_min(1)


def class_name_tokens(names: list[str], word_index: dict[str, int], width: int = 8) -> Tensor:
    """Word ids (PAD-padded) of each class name: the whole phrase if known, else its parts.

    ``word_index`` maps a word to its id (ids >= 2; 0 = PAD). Unknown parts are dropped, so a
    name without any known part gets an all-PAD row (a zero f_cat).
    """
    out = torch.zeros(len(names), width, dtype=torch.long)
    for i, name in enumerate(names):
        name = name.strip().lower().replace(" ", "_")
        ids = [word_index[name]] if name in word_index else []
        if not ids:
            ids = [word_index[p] for p in name.split("_") if p in word_index]
        ids = ids[:width]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
