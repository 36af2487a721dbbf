"""LeNet on MNIST with PyTorch DistributedDataParallel, from one CPU process to a SLURM cluster.

Importing the package does nothing: no process group, no device query, no file I/O.
"""

__version__ = "0.1.0"
