"""One file per transport; each is registered by name in ``collectives.registry``."""
