"""torch.library custom ops + autograd.Function for every masked op, routed through ``lthfast._backend``."""
