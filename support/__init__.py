"""Plumbing for the story scripts (model.py, train.py, sample.py, fid.py): data sets and caches, checkpoints
and run folders, released-weight readers, the frozen encoder and VAE, pictures and command-line helpers. A student
need not read it to learn the method."""
