"""The data path: MNIST-format datasets from their files to batches on the training device.

- `catalog`: the datasets (MNIST, Fashion-MNIST, KMNIST): file names, folders, mirrors, sums.
- `download`: fetching missing files from mirrors in order, checked, all or nothing.
- `idx`: reading and checking IDX files (and writing them, for tests and custom subsets).
- `store`: a data root's files -> verified uint8 tensors, cached per split for fast starts.
- `device`: the tensors on the training device, sharded across ranks, cut into batches; and
  `load_splits`, the one way training, evaluation and the benchmark read a dataset.
"""
