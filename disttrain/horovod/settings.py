"""The engine's knobs, read once from Horovod's environment variables at ``hvd.init()``."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Settings:
    cycle_s: float = 1e-3  # HOROVOD_CYCLE_TIME (ms in the environment)
    idle_s: float = 0.05  # an idle set still cycles this often (stalls, joins, shutdowns)
    fusion_bytes: int = 128 << 20  # HOROVOD_FUSION_THRESHOLD
    slots: int = 128  # DISTTRAIN_HVD_SLOTS: full announcements per row and cycle
    stall_warn_s: float = 60.0  # HOROVOD_STALL_CHECK_TIME_SECONDS (inf: HOROVOD_STALL_CHECK_DISABLE)
    stall_fail_s: float = 300.0  # HOROVOD_STALL_SHUTDOWN_TIME_SECONDS (default: the op timeout)
    timeout: float = 300.0  # DISTTRAIN_HVD_TIMEOUT
    cache_capacity: int = 1024  # HOROVOD_CACHE_CAPACITY (0: the response cache is off)

    @classmethod
    def from_env(cls, timeout: float) -> Settings:
        env = os.environ
        warn = 0 if env.get("HOROVOD_STALL_CHECK_DISABLE") else float(env.get("HOROVOD_STALL_CHECK_TIME_SECONDS", 60))
        fail = float(env.get("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", 0) or timeout)
        return cls(
            cycle_s=float(env.get("HOROVOD_CYCLE_TIME", 1.0)) / 1e3,
            fusion_bytes=int(env.get("HOROVOD_FUSION_THRESHOLD", 128 << 20)),
            slots=int(env.get("DISTTRAIN_HVD_SLOTS", 128)),
            stall_warn_s=warn if warn > 0 else float("inf"),
            stall_fail_s=fail,
            timeout=timeout,
            cache_capacity=int(env.get("HOROVOD_CACHE_CAPACITY", 1024)),
        )
