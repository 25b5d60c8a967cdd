"""The denoise report on the console (rich tables): metrics per noise level and method, speed vs quality, and
the choices and paired margins of the quality bar."""

from __future__ import annotations

from typing import Any

from meddiff.protocols.common import console as common_console
from meddiff.protocols.denoise.options import DDIM_BUDGET, DDIM_TOLERANCE_DB
from meddiff.protocols.denoise.outputs import reference_level


def print_report(report: dict[str, Any]) -> None:
    """Rich tables: metrics per noise level and method; speed of every method; the choices and paired margins."""
    from rich.table import Table

    console = common_console()
    bm3d = report.get("bm3d", {})
    for lkey, res in report["results"].items():
        note = ""
        if "bm3d" in res and bm3d.get("n_slices", 0) < bm3d.get("of_slices", 0):
            note = f"; bm3d on {bm3d['n_slices']} of {bm3d['of_slices']} slices"
        if "nlm" in res:
            note = f"; NLM h chosen on {report['nlm'][lkey]['chosen_on']}{note}"
        table = Table(title=f"Denoising, noise std {lkey} ({report['n_patches']} test patches, mean ± std{note})")
        for col in ("method", "PSNR dB", "SSIM", "MAE", "VSI", "slice PSNR", "s / patch"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for m, r in res.items():
            table.add_row(m, f"{r['psnr']:.2f} ± {r['psnr_std']:.2f}", f"{r['ssim']:.4f} ± {r['ssim_std']:.4f}",
                          f"{r['mae']:.4f}", f"{r['vsi']:.4f}", f"{r['slice_psnr']:.2f}", f"{r['sec_per_patch']:.4f}")
        console.print(table)
    if not bm3d.get("status", "used").startswith("used"):
        console.print(f"bm3d: {bm3d['status']}")
    for lkey, res in bm3d.get("on_its_slices", {}).items():
        table = Table(title=f"Noise std {lkey} on the {bm3d['n_slices']} slices BM3D ran on (mean over slices of "
                            "the patch means)")
        for col in ("method", "PSNR dB", "SSIM", "MAE", "VSI"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for m, r in res.items():
            table.add_row(m, f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r['mae']:.4f}", f"{r['vsi']:.4f}")
        console.print(table)
    ref = reference_level(report)
    table = Table(title=f"Speed vs quality (noise std {ref}, batch {report['batch_size']}, {report['device']}, "
                        f"{report['torch_threads']} threads)")
    for col in ("method", "steps", "s / patch", "PSNR dB", "SSIM", "VSI"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in report["speed"]:
        if f"{r['noise_std']:g}" == ref:
            table.add_row(r["method"], "" if r["steps"] is None else str(r["steps"]), f"{r['sec_per_patch']:.4f}",
                          f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r['vsi']:.4f}")
    console.print(table)
    for lkey, e in report["quality_bar"].items():
        on = e.get("chosen_on")
        if "note" in e:
            console.print(f"quality bar @ {lkey}: {e['note']}")
            continue
        if "best_ddim_le_50" in e:
            console.print(
                f"quality bar @ {lkey}: best DDIM <= {DDIM_BUDGET} steps (chosen on {on}, {e['n_val_patches']} "
                f"patches): {e['best_ddim_le_50']}; DDPM - it: {e['val_ddpm_minus_best_ddim_psnr_db']:+.2f} dB on "
                f"validation (within {DDIM_TOLERANCE_DB} dB: {e['ddim_within_0.5db_of_ddpm']}), "
                f"{e['test_ddpm_minus_best_ddim_psnr_db']:+.2f} dB on test")
        for name, ms in e.get("margins", {}).items():
            first = next(iter(ms.values()))
            if "diff" not in first:
                console.print(f"margin of {first['model']} over {first['baseline']} @ {lkey}: {first['note']}")
                continue
            what = f"the best classical baseline ({first['baseline']}, chosen on {on})" if name == "best_classical" \
                else first["baseline"]
            console.print(
                f"margin of {first['model']} over {what} @ {lkey}, paired over {first['n_slices']} test slices "
                f"(CI by {first['by']}): " + "; ".join(
                    f"{k.upper()} {m['diff']:+.4g} [{m['diff_ci'][0]:+.4g}, {m['diff_ci'][1]:+.4g}]"
                    for k, m in ms.items() if "diff" in m))
