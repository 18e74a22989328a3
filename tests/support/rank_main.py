"""Child side of tests.support.harness.spawn: call module:function(**args), write its result as JSON."""

import importlib
import json
import sys


def main() -> None:
    target, args, out_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    module_name, _, fn_name = target.partition(":")
    result = getattr(importlib.import_module(module_name), fn_name)(**args)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
    from disttrain.teardown import leave

    leave(0)  # as our workers end: once, a finished rank aborted in the interpreter's teardown (see there)
