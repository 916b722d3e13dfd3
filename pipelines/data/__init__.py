"""Data sources, one module per pipeline (tabular, images, text, custom), what they share
(common: errors, files, the prepared datasets; arrays, augment, features, tokenizers), and the
models a run logs, which take the rows users have (serving)."""
