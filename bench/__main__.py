"""python -m bench <command> [options]: run from the repository root; `python -m bench <command> --help` for options.

    loss       the GVPO loss, forward + backward, against eager, torch.compile and the fused peers (bench/loss.py)
    stats      per-token log-probs and entropy: the anchor pass and the statistics pass (bench/stats.py)
    trl-step   GVPOTrainer against TRL's GRPOTrainer: the update and a whole training step (bench/trl_step.py)
    report     re-make the table (and the loss plot) from a results JSON (bench/report.py)
"""

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("loss", "stats", "trl-step", "report"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "loss":
        from .loss import main as run
    elif command == "stats":
        from .stats import run
    elif command == "trl-step":
        from .trl_step import main as run
    else:
        from .report import main as run
    return run(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
