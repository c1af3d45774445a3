"""Key conventions of weights files across tools: which module of one layout is which of another (Flux.1's BFL
names and diffusers' transformer, the LDM/SGM UNet and diffusers' UNet), and LoRA files moved between diffusers,
kohya and the original layouts."""
