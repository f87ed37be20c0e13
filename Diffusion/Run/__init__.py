"""What runs the paper: the config and its keys, the data, several processes and their random
numbers, the checkpoint files and the training state, the training run's bookkeeping, the sampler
a config asks for, the evaluation states (eval, fid, nll) and the metrics. Main.py and
MainCondition.py start here (Scripts.py)."""
