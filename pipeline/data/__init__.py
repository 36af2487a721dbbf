"""The data path: MNIST-format datasets from their files to batches on the training device
(docs/layout.md lists its modules)."""
