"""One op per module: argument checks, references, the torch.library ops (schema, fake, autograd), the public
functional, its implementations registered with dispatch with their refusal rules, sample_inputs()."""
