"""Pipeline parallel: stage split (``split``), schedules (``schedule``), activations on the wire (``wire``), the per-step driver (``step``) and the strategy part (``parallel``)."""
