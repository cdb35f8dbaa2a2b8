"""Datasets: the embedded digits set, CIFAR pickles, class folders, synthetic."""
