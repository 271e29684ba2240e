"""The `qrkd` command."""

from __future__ import annotations

import argparse
import platform
import sys


def cmd_info(args) -> int:
    import torch

    import qrkd
    from qrkd import backends

    print(f"qrkd {qrkd.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"cuda available: {torch.cuda.is_available()}  threads: {torch.get_num_threads()}")
    print("backends:")
    for name, (ok, detail) in backends.backend_status().items():
        print(f"  {name:<10} {'yes' if ok else 'no ':<4} {detail}")
    chosen = backends.env_backend()
    if chosen and chosen != "auto":
        if chosen not in backends.backend_status():
            print(f"QRKD_BACKEND is set to an unknown value {chosen!r}: every loss call with backend='auto' raises "
                  f"ValueError; use 'auto' or one of {list(backends.backend_status())}")
        elif not backends.backend_status()[chosen][0]:
            print(f"QRKD_BACKEND={chosen} replaces 'auto', but that backend is not available: loss calls with "
                  "backend='auto' raise ValueError")
        else:
            print(f"QRKD_BACKEND={chosen} replaces 'auto' (the picks below are what 'auto' would choose without it)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("auto picks:")
    for device in devices:
        picks = ", ".join(f"{op}={backends.auto_backend_name(op, device)}" for op in backends.OPS[:4])
        print(f"  {device}: {picks}")
    return 0


# compare and bench own their options: their modules parse the rest of the command line (name: (module, help))
_FORWARDED_COMMANDS = {
    "compare": ("qrkd.experiment", "the seed experiment: teacher + students, table, plots"),
    "bench": ("qrkd.benchmark", "benchmark sweep: every kernel against its references"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qrkd",
                                     description="Relational knowledge-distillation losses and experiments")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, backends and what `auto` picks")
    info.set_defaults(func=cmd_info)
    for name, (module, help_text) in _FORWARDED_COMMANDS.items():
        forwarded = sub.add_parser(name, help=help_text, add_help=False)
        forwarded.add_argument("rest", nargs=argparse.REMAINDER)
        forwarded.set_defaults(func=lambda args, module=module: _forward(module, args.rest))
    return parser


def _forward(module: str, argv) -> int:
    import importlib

    return int(importlib.import_module(module).main(list(argv)) or 0)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse's REMAINDER does not capture a rest that starts with an option (`qrkd bench --quick`): forward first
    if argv and argv[0] in _FORWARDED_COMMANDS:
        return _forward(_FORWARDED_COMMANDS[argv[0]][0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
