"""The embedded demo (`make demo` = `python -m lthfast demo`): lottery tickets of an MLP on MNIST-1D.

Twelve trainings of the ticket (dense, then 11 levels at 20% per level: 8.6% of the weights remain) and the
random-reinit and random-prune controls at five levels, one thread (a tiny MLP runs fastest on one core, and
two threads on a busy 2-core machine were 20x slower than one in our measurements).
"""

DEMO = {
    "model": "mlp",
    "hidden": [100, 100],
    "dataset": "mnist1d",
    "num_samples": 10_000,
    "optimizer": "adam",
    "lr": 2e-3,
    "batch_size": 100,
    "train_steps": "1000it",
    "eval_every": "100it",
    "levels": 11,
    "prune_fraction": 0.2,
    "controls": ["random_reinit", "random_prune"],
    "control_levels": [3, 5, 7, 9, 11],
    "threads": 1,
}
