"""Triton kernels and their launchers (check, allocate, launch). No autograd and no modules here.

Importing a kernel module requires triton; ``lthfast._backend`` decides whether they are used.
"""
