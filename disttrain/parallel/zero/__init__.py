"""ZeRO 1/2/3: the strategy (``strategy``) over flat units of parameters (``flat_unit``)."""
