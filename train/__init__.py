"""Training jobs: data, the controller, Stage-1 sparse fine-tuning, variants."""
