"""SEJE phase I feature engineering: key terms (ingredients, actions, utensils), their rating
(TF-IDF, TextRank, BERT) and the per-recipe weighted key-term vectors stored in the cache."""

from jointgen.features.keyterms import write_keyterms
from jointgen.features.lexicon import derive_lexicon, recover_phrases
from jointgen.features.rating import BertScorer, idf, textrank, tfidf

__all__ = [
    "BertScorer",
    "derive_lexicon",
    "idf",
    "recover_phrases",
    "textrank",
    "tfidf",
    "write_keyterms",
]
