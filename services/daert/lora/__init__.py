"""LoRA router: adapter registry and adapter-affinity routing (`daert serve lora`)."""
