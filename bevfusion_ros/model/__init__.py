"""PyTorch model toolkit (optional extra ``model``): BEVFusion definition, export, reference."""
