"""Reports, figures and comparisons of evaluations."""
