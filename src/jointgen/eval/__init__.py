"""Fully offline evaluation suite for the joint caption–image model on the shapes (spec §5).

Model-agnostic functions: they take generated images and captions plus ground truth and
return numbers. Image attributes come from an analytic inversion of the renderer or a small
CNN (``attributes``, ``classifier``), caption attributes from the exact grammar parser
(``coherence``); caption quality in ``text_metrics``, the in-domain Fréchet distance in
``frechet``, latent linear probes in ``probes`` and JSON/markdown output in ``report``.
"""

from jointgen.eval.attributes import analytic_attributes, image_attributes, to_uint8_nhwc
from jointgen.eval.classifier import (
    AttributeClassifier,
    default_cache_dir,
    extract_features,
    train_attribute_classifier,
)
from jointgen.eval.coherence import (
    attribute_agreement,
    cross_coherence_img2txt,
    cross_coherence_txt2img,
    joint_coherence,
    letters_accuracy,
    parse_captions,
)
from jointgen.eval.frechet import (
    FD_LABEL,
    ClassifierFeatures,
    frechet_distance,
    in_domain_fd_metric,
)
from jointgen.eval.probes import logistic_probe, probe_attributes, probe_private, ridge_r2
from jointgen.eval.report import (
    LEADERBOARD_COLUMNS,
    leaderboard_row,
    leaderboard_table,
    markdown_table,
    write_results,
)
from jointgen.eval.text_metrics import (
    bleu4,
    caption_metrics,
    caption_perplexity,
    exact_match,
    reference_sets,
    token_accuracy,
    token_nll,
)

__all__ = [
    "FD_LABEL",
    "LEADERBOARD_COLUMNS",
    "AttributeClassifier",
    "ClassifierFeatures",
    "analytic_attributes",
    "attribute_agreement",
    "bleu4",
    "caption_metrics",
    "caption_perplexity",
    "cross_coherence_img2txt",
    "cross_coherence_txt2img",
    "default_cache_dir",
    "exact_match",
    "extract_features",
    "frechet_distance",
    "image_attributes",
    "in_domain_fd_metric",
    "joint_coherence",
    "leaderboard_row",
    "leaderboard_table",
    "letters_accuracy",
    "logistic_probe",
    "markdown_table",
    "parse_captions",
    "probe_attributes",
    "probe_private",
    "reference_sets",
    "ridge_r2",
    "to_uint8_nhwc",
    "token_accuracy",
    "token_nll",
    "train_attribute_classifier",
    "write_results",
]
