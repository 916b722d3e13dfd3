"""Jobs built on training, never imported by it: submit, tune, predict, generate."""
