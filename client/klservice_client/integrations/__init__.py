"""Integrations of klservice with training frameworks.

- `klservice_client.integrations.trl`: `KLServiceGRPOTrainer`, TRL's `GRPOTrainer` with its
  reference model served by klservice (``pip install 'klservice-client[trl]'``).

Each integration imports its framework only when imported itself, so ``import
klservice_client`` stays light.
"""
