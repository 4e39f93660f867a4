"""The training loop and its faults: the driver, the trainer, each family's plug-in, run folders."""
