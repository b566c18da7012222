"""The embedded demo (`make demo` = `python -m lthfast demo`): lottery tickets of an MLP on MNIST-1D.

The default MLP (40-256-256-10, Adam 1e-3) trained 1,000 iterations per level instead of 2,000: twelve trainings
of the ticket (dense, then 11 levels at 20% per level: 8.6% of the weights remain) and the random-reinit and
random-prune controls at five levels. 79 s on one thread of a 2-core x86 VM (including 5 s to generate the data).
One thread: a tiny MLP runs fastest on one core, and with two threads on the busy shared 2-core machine a
training step took 60-90 ms instead of 3 ms.
"""

DEMO = {
    "model": "mlp",
    "hidden": [256, 256],
    "dataset": "mnist1d",
    "num_samples": 10_000,
    "optimizer": "adam",
    "lr": 1e-3,
    "batch_size": 100,
    "train_steps": "1000it",
    "eval_every": "100it",
    "levels": 11,
    "prune_fraction": 0.2,
    "controls": ["random_reinit", "random_prune"],
    "control_levels": [3, 5, 7, 9, 11],
    "threads": 1,
}
