"""An elastic job's worker that only waits (tests/test_security_elastic.py): it writes its pid and
the driver's store address to ``DIR/worker<id>.json`` (mode 0600), then sleeps until the driver
stops it. The doors under test are the driver's, so no collectives run here.

    disttrain launch --min-np 1 --max-np 3 --host-discovery-script ./hosts.sh tests/cases/elastic_idle.py DIR
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    me = os.environ["DISTTRAIN_ELASTIC_ID"]
    row = {"pid": os.getpid(), "id": me, "host": os.environ["DISTTRAIN_HOST"], "store": os.environ["DISTTRAIN_STORE"]}
    path = os.path.join(sys.argv[1], f"worker{me}.json")
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(row, f)
    os.replace(path + ".tmp", path)
    while True:
        time.sleep(0.1)


if __name__ == "__main__":
    main()
