"""Integrations of klservice with training frameworks.

- `klservice_client.integrations.trl`: `KLServiceGRPOTrainer`, TRL's `GRPOTrainer` with its
  reference model served by klservice (``pip install 'klservice-client[trl]'``).
- `klservice_client.integrations.verl`: ``python -m klservice_client.integrations.verl``, verl's
  PPO/GRPO trainer with no reference worker, ``ref_log_prob`` from the server
  (``pip install 'klservice-client[verl]'``).
- `klservice_client.integrations.openrlhf`: ``python -m klservice_client.integrations.openrlhf``,
  OpenRLHF's ``train_ppo_ray`` with `ServedReferenceGroup` where its reference actors were.

Each integration imports its framework only when imported itself, so ``import
klservice_client`` stays light.
"""
