"""The data plane: everything that runs inside a Ray Train worker (model, losses, data, training step)."""
