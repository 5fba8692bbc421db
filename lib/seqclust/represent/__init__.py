"""From sessions to vectors: tokens, behaviour features, the encoder, its training and embedding."""
