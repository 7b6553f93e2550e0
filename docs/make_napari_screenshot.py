"""Make docs/napari_widget.png: a real napari window with the SegGPT widget after a real run.

Opens the plugin's nuclei sample (31-slice stack, three slices annotated from the ground truth),
propagates through the stack with the demo model and Output "instances" (one id, one colour per
nucleus, kept from slice to slice), shows a slice that was not annotated with the Review list of the
run's slices (least confident first), and saves a screenshot of the whole window. Needs a display; on a
headless machine:

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_napari_screenshot.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "napari_widget.png")
    parser.add_argument("--slice", type=int, default=12, help="slice to show (not an annotated one)")
    parser.add_argument("--memory", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)

    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True, title="SegGPT in napari")
    viewer.window.resize(1500, 950)
    viewer.open_sample("seggpt-plugins", "nuclei3d")
    _dock, widget = viewer.window.add_plugin_dock_widget("seggpt-plugins", "SegGPT")
    widget._memory.value = args.memory
    widget._confidence.value = False
    widget._output.value = "instances"

    widget._propagate_btn.native.click()  # the real button, as a user would
    start = time.monotonic()
    while widget.running and time.monotonic() - start < args.timeout:
        QApplication.processEvents()
        time.sleep(0.02)
    if widget.running or not widget.last_run or widget.last_run["error"]:
        print(f"the run did not finish: {widget.last_run}", file=sys.stderr)
        return 1
    result = viewer.layers["nuclei3d SegGPT"]
    done = int(np.count_nonzero(np.any(result.data, axis=(1, 2))))
    objects = len(np.unique(result.data)) - 1
    print(f"{done} slices segmented in {widget.last_run['seconds']:.1f} s; {objects} objects")

    viewer.layers["nuclei3d annotations"].visible = True
    viewer.dims.set_current_step(0, args.slice)
    viewer.layers.selection.active = result
    viewer.reset_view()
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    image = viewer.screenshot(canvas_only=False, flash=False)
    from PIL import Image

    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image)).save(args.out)
    print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]})")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
