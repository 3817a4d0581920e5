"""Initialise the joint VAE's caption embeddings from word2vec vectors when training starts.

The data module supplies the matrix (``caption_embeddings(seed)``, e.g.
``JointRecipe1MDataModule``: the word2vec rows of its caption vocabulary), so the model config
stays free of file reads and a checkpoint reloads without the word vectors. It runs in
``setup`` of a fit, before the optimizer exists; when a run resumes, the checkpoint's weights
are restored afterwards and replace it. Every token embedding of the text branch whose shape
matches is set (the caption encoder's and, when autoregressive, the decoder's input).
"""

from __future__ import annotations

import logging

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from jointgen.utils.checks import ConfigError

log = logging.getLogger(__name__)


class Word2VecInit(Callback):
    """Copy the data module's word2vec caption embeddings into the text branch.

    Args:
        seed: Seed of the rows without a word vector (special tokens, unused ids).
        freeze: Keep the copied embeddings fixed during training.
    """

    def __init__(self, seed: int = 0, freeze: bool = False) -> None:
        self.seed, self.freeze = seed, freeze

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        if not hasattr(dm, "caption_embeddings"):
            log.warning("Word2VecInit: the data module has no caption_embeddings; skipped")
            return
        matrix = dm.caption_embeddings(self.seed)
        txt = pl_module.net.branches["txt"]
        targets = [m for m in txt.modules() if isinstance(m, nn.Embedding)]
        hits = [m for m in targets if m.weight.shape == matrix.shape]
        if not hits:
            shapes = sorted({tuple(m.weight.shape) for m in targets})
            raise ConfigError(
                f"word2vec caption embeddings are {tuple(matrix.shape)} but the text branch "
                f"embeddings are {shapes}; set model.net.text.embed_dim=${{data.vocab.dim}}"
            )
        for m in hits:
            m.weight.data.copy_(matrix.to(m.weight))
            m.weight.requires_grad_(not self.freeze)
        log.info("caption embeddings initialised from word2vec: %d table(s) %s%s",
                 len(hits), tuple(matrix.shape), " (frozen)" if self.freeze else "")  # fmt: skip
