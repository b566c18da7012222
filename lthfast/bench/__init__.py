"""`lthfast bench`: timing method, providers, JSON and plots."""
