"""What post-training adds to a run: LoRA adapters, DPO against a frozen reference,
contrastive heads, and the plan of which parameters are trained."""
