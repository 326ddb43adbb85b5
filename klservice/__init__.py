"""klservice: a shared, frozen reference language model for RL trainers, served over gRPC.

The server answers reference per-token log-probs, KL estimator values and the exact
gradient coefficient of the KL implementation a trainer asks for (see
`klservice_client.kl`). Start it with ``klservice serve``; see ``klservice --help``.
"""

__version__ = "0.1.0"
