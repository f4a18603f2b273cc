"""dapo-pl: DAPO (Dynamic sAmpling Policy Optimization, arXiv 2503.14476) on PyTorch Lightning.

Where each DAPO technique lives:
- clip-higher and the token-level loss: :mod:`dapo_pl.objective` (``policy_loss``), denominator shared across
  micro-batches and ranks by :func:`dapo_pl.objective.token_mean_denominator`;
- dynamic sampling: :mod:`dapo_pl.sampling` (group filter, carry-over buffer, refill loop);
- overlong reward shaping (Eq. 13): :func:`dapo_pl.objective.overlong_penalty`, applied by the built-in
  ``overlong`` verifier; overlong filtering: :func:`dapo_pl.sampling.overlong_filter_mask`.
"""

__version__ = "0.1.0"
