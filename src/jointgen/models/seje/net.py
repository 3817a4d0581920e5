"""SEJE network: image and recipe encoders into one L2-normalised joint space, shared semantic
branch and modality discriminator.

Paper: Xie, Liu et al., "Learning Text-Image Joint Embedding for Efficient Cross-Modal
Retrieval with Deep Feature Engineering", ACM TOIS 40(4), 2022, arXiv 2110.11592;
official code https://github.com/git-disl/SEJE (an extension of im2recipe-Pytorch). Spec
``seje.md`` §2.

Sizes that only the data knows (vocabulary, key-term vocabulary, classes) may be left as None:
the network is then built in two steps, the data-independent image encoder and discriminator at
construction and the rest by :meth:`SEJE.build` (the LightningModule calls it from its
``configure_model`` hook with the datamodule's sizes and word vectors, or from
:meth:`SEJE.build_from_state_dict` when a checkpoint is loaded into a fresh model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from jointgen.models.seje.image import ImageCategoryVector, ImageEncoder
from jointgen.models.seje.losses import Discriminator
from jointgen.models.seje.text import RecipeEncoder


@contextmanager
def private_rng(seed: int | None = None) -> Iterator[None]:
    """Run the block on a copy of torch's CPU generator and restore it afterwards.

    Parameters created inside take their random numbers from a stream of their own, and
    whatever draws next outside sees the global stream as if the block had not run. With
    ``seed`` the copy is reseeded first, from a value mixed out of ``seed`` (so its numbers
    are not those ``torch.manual_seed(seed)`` gave the parts built earlier); the block's draws
    are then a function of ``seed`` alone. CUDA generators are not touched (modules are built
    on the CPU).
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            mixed = np.random.SeedSequence([int(seed) % 2**63, 0x5E7E]).generate_state(1)
            torch.manual_seed(int(mixed[0]))
        yield


@dataclass
class SEJEOutput:
    """Embeddings ``(B, E)`` of both modalities and their semantic logits ``(B, C)``."""

    img: Tensor
    rec: Tensor
    logits_img: Tensor
    logits_rec: Tensor


class SEJE(nn.Module):
    """The SEJE joint-embedding network (torch only).

    Args:
        image_encoder: ``resnet50`` | ``resnext101_32x8d`` (the released model) |
            ``wide_resnet50_2`` | ``small_cnn`` (CPU demos).
        image_weights: Local state-dict file for the CNN (None: random init).
        pretrained: Load torchvision ImageNet weights from the hub cache (never downloads).
            Both are applied by ``image.load_weights()``, which the LightningModule calls when
            fitting starts, so restoring or evaluating a checkpoint never needs the file.
        cnn_width: ``small_cnn`` base width.
        freeze_backbone: Keep the CNN fixed.
        embed_dim: Joint-space size (1024).
        word_dim: Word-vector size (300; must equal the word2vec file's).
        freeze_words: Keep word vectors fixed.
        instr_source: ``auto`` | ``trainable`` | ``precomputed`` (see ``RecipeEncoder``).
        sentence_hidden: Trainable sentence encoder units per direction (512).
        sentence_rnn: ``lstm`` | ``gru``.
        sentence_dim: Size of precomputed sentence vectors (1024).
        instr_hidden: Instruction LSTM size (1024).
        keyterm_encoder: ``word2vec`` (SEJE f_term) | ``linear`` | ``none``.
        ingredient_hidden: Ingredient bi-LSTM units per direction (0 = off; im2recipe: 300).
        title_hidden: Title bi-LSTM units per direction (0 = off).
        category_arch: Architecture of the image classifier behind f_cat (used when
            :meth:`build` gets its weights; f_cat is zero otherwise).
        disc_hidden: Discriminator hidden sizes (512, 256).
        vocab_size / num_keyterms / num_classes: Data sizes; None = built later by
            :meth:`build`.
    """

    def __init__(
        self,
        image_encoder: str = "resnext101_32x8d",
        image_weights: str | None = None,
        pretrained: bool = False,
        cnn_width: int = 32,
        freeze_backbone: bool = False,
        embed_dim: int = 1024,
        word_dim: int = 300,
        freeze_words: bool = False,
        instr_source: str = "auto",
        sentence_hidden: int = 512,
        sentence_rnn: str = "lstm",
        sentence_dim: int = 1024,
        instr_hidden: int = 1024,
        keyterm_encoder: str = "word2vec",
        ingredient_hidden: int = 0,
        title_hidden: int = 0,
        category_arch: str = "wide_resnet50_2",
        disc_hidden: tuple[int, int] = (512, 256),
        vocab_size: int | None = None,
        num_keyterms: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        for key, value in (("embed_dim", embed_dim), ("word_dim", word_dim)):
            if value <= 0:
                raise ValueError(f"model.net.{key} must be positive, got {value}")
        self.embed_dim, self.word_dim = embed_dim, word_dim
        self.category_arch, self.cnn_width = category_arch, cnn_width
        self.recipe_kwargs: dict[str, Any] = dict(
            embed_dim=embed_dim,
            word_dim=word_dim,
            freeze_words=freeze_words,
            instr_source=instr_source,
            sentence_hidden=sentence_hidden,
            sentence_rnn=sentence_rnn,
            sentence_dim=sentence_dim,
            instr_hidden=instr_hidden,
            keyterm_encoder=keyterm_encoder,
            ingredient_hidden=ingredient_hidden,
            title_hidden=title_hidden,
        )
        self.image = ImageEncoder(
            image_encoder,
            embed_dim,
            cat_dim=word_dim,
            weights=image_weights,
            pretrained=pretrained,
            width=cnn_width,
            freeze_backbone=freeze_backbone,
        )
        self.discriminator = Discriminator(embed_dim, tuple(disc_hidden))
        self.recipe: RecipeEncoder | None = None
        self.semantic: nn.Linear | None = None
        self.category: ImageCategoryVector | None = None
        sizes = (vocab_size, num_keyterms, num_classes)
        if all(s is not None for s in sizes):
            self.build(vocab_size, num_keyterms, num_classes)
        elif any(s is not None for s in sizes):
            raise ValueError("give all of vocab_size, num_keyterms, num_classes or none")

    # --- building -------------------------------------------------------------------------

    @property
    def built(self) -> bool:
        return self.recipe is not None

    def sizes(self) -> dict[str, int]:
        """The data sizes the built network expects."""
        if not self.built:
            raise RuntimeError("the SEJE network is not built yet (call build)")
        return {
            "vocab_size": self.recipe.words.num_embeddings,
            "num_keyterms": self._num_keyterms,
            "num_classes": self.semantic.out_features,
        }

    def build(
        self,
        vocab_size: int,
        num_keyterms: int,
        num_classes: int,
        word_vectors: Tensor | None = None,
        keyterm_word_ids: Tensor | None = None,
        category_tokens: Tensor | None = None,
        category_state: dict | None = None,
        seed: int | None = None,
    ) -> None:
        """Create the data-sized parts (recipe encoder, semantic branch, f_cat classifier).

        They are built after the data are known, i.e. after whatever the caller ran since
        seeding (data preparation; Lightning's DDP reseeds every process at setup). With
        ``seed`` their initial weights depend on it alone (see :func:`private_rng`): one
        process and every DDP rank build the same weights, and the global RNG stream is left
        unchanged. None: they draw from the global stream, as any module does.

        Args:
            vocab_size: Word ids (word2vec rows + 2).
            num_keyterms: ``V_kt``.
            num_classes: Recipe categories (semantic branch outputs).
            word_vectors: ``(vocab_size - 2, word_dim)`` initial word vectors, or None.
            keyterm_word_ids: ``(V_kt,)`` word id per key term (``word2vec`` key-term mode).
            category_tokens: ``(C_img, T)`` word ids of the image classifier's class names;
                with ``category_state`` this switches f_cat on.
            category_state: State dict of the image classifier (``category_arch``).
            seed: Seed of the new parts' initial weights, or None (see above).
        """
        if self.built:
            raise RuntimeError("the SEJE network is already built")
        for key, value in (("vocab_size", vocab_size), ("num_keyterms", num_keyterms)):
            if value < (3 if key == "vocab_size" else 1):
                raise ValueError(f"{key} is {value}: the data has no words/key terms")
        self._num_keyterms = num_keyterms
        with nullcontext() if seed is None else private_rng(seed):
            self.recipe = RecipeEncoder(
                vocab_size,
                num_keyterms,
                word_vectors=word_vectors,
                keyterm_word_ids=keyterm_word_ids,
                **self.recipe_kwargs,
            )
            self.semantic = nn.Linear(self.embed_dim, max(1, num_classes))  # shared by v and r
            if category_tokens is not None:
                self.category = ImageCategoryVector(
                    self.category_arch, category_tokens.shape[0], category_tokens, self.cnn_width
                )
                if category_state is not None:
                    self.category.classifier.load_state_dict(category_state)

    def build_from_state_dict(self, state: dict, prefix: str = "") -> None:
        """Build with the sizes found in a state dict (values are loaded afterwards, so the
        throw-away initialisation runs on a private generator: the global stream is left as
        it was)."""
        words = state[f"{prefix}recipe.words.weight"]
        kt = self.recipe_kwargs["keyterm_encoder"]
        if kt == "word2vec":
            num_kt = state[f"{prefix}recipe.keyterms.word_ids"].shape[0]
        elif kt == "linear":
            num_kt = state[f"{prefix}recipe.keyterms.proj.0.weight"].shape[1]
        else:
            num_kt = 1
        tokens = state.get(f"{prefix}category.class_tokens")
        with private_rng():
            self.build(words.shape[0], num_kt, state[f"{prefix}semantic.weight"].shape[0])
            if tokens is not None:
                self.category = ImageCategoryVector(
                    self.category_arch, tokens.shape[0], tokens, self.cnn_width
                )

    def check_sizes(self, vocab_size: int, num_keyterms: int, num_classes: int) -> None:
        """Raise ``ValueError`` naming the first size that differs from the data's."""
        for key, have in self.sizes().items():
            want = {"vocab_size": vocab_size, "num_keyterms": num_keyterms}.get(key, num_classes)
            if key == "num_keyterms" and self.recipe_kwargs["keyterm_encoder"] == "none":
                continue
            if have != max(1, want):
                raise ValueError(f"model.net.{key}={have} but the data has {want}")

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(cnn, rest)`` trainable parameters of the embedding model (discriminator excluded)."""
        cnn = [p for p in self.image.cnn.parameters() if p.requires_grad]
        ids = {id(p) for p in cnn} | {id(p) for p in self.discriminator.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return cnn, rest

    # --- forward --------------------------------------------------------------------------

    def embed_image(self, image: Tensor, f_cat: Tensor | None = None) -> Tensor:
        """Image embeddings; a batch ``f_cat`` (official pickles) wins over the classifier."""
        if f_cat is None and self.category is not None:
            f_cat = self.category(image, self.recipe.words)
        return self.image(image, f_cat)

    def embed_recipe(self, batch: dict) -> Tensor:
        if not self.built:
            raise RuntimeError("the SEJE network is not built yet (call build)")
        return self.recipe(batch)

    def forward(self, batch: dict) -> SEJEOutput:
        img = self.embed_image(batch["image"], batch.get("f_cat"))
        rec = self.embed_recipe(batch)
        return SEJEOutput(img, rec, self.semantic(img), self.semantic(rec))
