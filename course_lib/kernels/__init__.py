"""GPU kernels (Triton) with pure-torch fallbacks; each is tested on CPU under TRITON_INTERPRET=1."""
