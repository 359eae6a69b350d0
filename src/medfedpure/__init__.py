"""MedFedPure: federated personalized MoE brain-MRI classification with client-side defenses."""

__version__ = "0.1.0"
