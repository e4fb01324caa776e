"""``scaling COMMAND [ARGS]`` (the console command) and ``python -m scaling COMMAND [ARGS]``.

Each command is the same program as ``python -m scaling.COMMAND``: ``scaling train +exp=resnet``
is ``python -m scaling.train +exp=resnet``. Under torchrun, which runs Python modules by default,
``torchrun --nproc_per_node=2 --no-python scaling train +exp=resnet`` runs the installed command.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("scaling.train.__main__", "one instrumented training job (run it under torchrun, srun or mpiexec)"),
    "study": ("scaling.study.__main__", "a scaling study: the job at every world size, then its report"),
    "report": ("scaling.report.__main__", "tables, plots and findings of studies; --against compares two"),
    "predict": ("scaling.predict.__main__", "step time and bound at world sizes or links not run"),
    "infer": ("scaling.infer.__main__", "inference latency against throughput"),
    "commbench": ("scaling.commbench", "collective microbenchmark with an alpha/beta fit"),
    "wandb-report": ("scaling.wandb_report", "publish a study's W&B Report once its offline runs are synced"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: scaling COMMAND [ARGS ...]   (scaling COMMAND -h for a command's own help)", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name = args[0]
    if name not in COMMANDS:
        print(f"scaling: error: no command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    # Every command reads its arguments from sys.argv, as it does under python -m.
    sys.argv = [f"scaling {name}", *args[1:]]
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main() or 0)


if __name__ == "__main__":
    sys.exit(main())
