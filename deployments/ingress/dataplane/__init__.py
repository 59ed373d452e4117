"""The data plane: what every API does, with no transport and no Ray."""
