"""A scoring rule of one's own, compared with edge-popup as the source thins out.

The rule is defined and registered here, in the script: slt is not edited. Then one sweep
crosses source densities with both rules, and the report tabulates the tickets. Offline
(the planted-teacher task of quick.toml), about a minute on a laptop CPU.

    python examples/density_sweep_with_own_rule.py [--out runs/own-rule]
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

import slt
from slt.layers import MaskedLayer
from slt.scorers import SCORERS, Budget, topk_masks
from slt.scorers.edge_popup import EdgePopup


@SCORERS.register("magnitude-popup")
class MagnitudePopup(EdgePopup):
    """edge-popup whose scores are weighted by the frozen weight's magnitude: the top-k of
    |s * w| rather than |s|, so large random weights are kept more readily."""

    name = "magnitude-popup"
    summary = "top-k edges by |score * weight| (an example rule)"

    def masks(self, layers: Sequence[MaskedLayer], budget: Budget, training: bool
              ) -> list[Tensor]:
        return topk_masks([(layer.scores * layer.weight_src).abs() for layer in layers],
                          budget)


SWEEP = """
base = "quick.toml"
[set]
data.train_size = 8192
search.epochs = 3
search.ticket_density = 0.05
[axes]
source.density = [1.0, 0.5, 0.2]
search.scorer = ["edge-popup", "magnitude-popup"]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/own-rule", help="folder of run directories")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "own_rule.toml").write_text(SWEEP)
    outcome = slt.sweep(out / "own_rule.toml", out=out, report=False, log=lambda _: None)
    print(f"{len(outcome.done)} runs, {len(outcome.failed)} failed")
    report = slt.report(out, evaluate_survival=False, log=lambda _: None)
    print(f"report: {report}")
    with open(report.parent / "results.csv", newline="") as f:
        for row in sorted(csv.DictReader(f), key=lambda r: (r["search.scorer"],
                                                            -float(r["source.density"]))):
            print(f"  {row['search.scorer']:16s} source density {float(row['source.density']):.1f}"
                  f"  test acc {float(row['final_test_acc']):.4f}")


if __name__ == "__main__":
    main()
