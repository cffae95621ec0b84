"""Tracing per code length and coalition size (issue 13): a table from a collusion sweep's points.

    python -m fingerprint_lm +experiment=collusion_sweep sweep.grid.method=carrier \\
        'sweep.grid.fingerprint_bits="64,128,256"' sweep.grid.act=all \\
        'sweep.grid.case="none_c1,average_c2,average_c3,average_c5,aligned_average_c2,aligned_average_c3,aligned_average_c5,image_mix_c2,image_mix_c3,image_mix_c5,image_blend_c2,image_blend_c3,image_blend_c5"' \\
        seed=0,1,2,3 hydra.sweep.dir=outputs/long_codes
    python experiments/long_codes_table.py outputs/long_codes

Per (length, collusion, c), over the sweep's seeds (each seed draws other colluders, innocents and
ACT seeds): the share of seeds where tracing caught at least one colluder, with the evidence rule
(per-image + pooled) and with the symmetric Tardos score, the innocents accused in all of them,
the share of images attributed to a colluder, and the colluders' bit accuracy.
"""  # noqa: E501 (the sweep command's case list is one shell word)

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for path in sorted(args.sweep_dir.glob("*/metrics.json")):
        row = json.loads(path.read_text())
        groups[(row["fingerprint_bits"], row["attack"], row["colluders"])].append(row)
    print("| bits | collusion | c | seeds | P[catch >= 1] evidence | P[catch >= 1] Tardos | innocents accused "
          "(evidence / Tardos) | images attributed to a colluder | colluders' bit_acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (bits, attack, colluders), rows in sorted(groups.items()):
        caught = np.mean([r["tracing_caught"] >= 1 for r in rows])
        tardos = np.mean([r.get("tardos_caught", 0) >= 1 for r in rows])
        innocents = sum(r["tracing_innocents_accused"] for r in rows)
        tardos_innocents = sum(r.get("tardos_innocents_accused", 0) for r in rows)
        print(f"| {bits} | {attack} | {colluders} | {len(rows)} | {caught:.2f} | {tardos:.2f} | "
              f"{innocents} / {tardos_innocents} | {np.mean([r['attribution_acc'] for r in rows]):.3f} | "
              f"{np.mean([r['bit_acc'] for r in rows]):.3f} |")


if __name__ == "__main__":
    main()
