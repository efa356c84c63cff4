"""The language-model toolkit: corpora, models, training, evaluation and generation."""
