"""Screenshot of the Scarce napari widget after segmenting a nist_rpe image (docs/napari_widget.png).

Run under a display (e.g. ``xvfb-run -a .venv/bin/python docs/make_napari_screenshot.py
--model runs/nist``) from the repository root.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import imageio.v3 as iio
import napari
from qtpy.QtWidgets import QApplication

from scarce.io import read_image
from scarce.napari.widget import ScarceWidget

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nist_rpe" / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/nist")
    parser.add_argument("--image", default=str(DATA / "img_004422.tif"))
    parser.add_argument("--out", default=str(Path(__file__).with_name("napari_widget.png")))
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # no deprecation toasts over the canvas
    napari.settings.get_settings().application.gui_notification_level = "error"
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 760)
    viewer.add_image(read_image(args.image)[0], name=Path(args.image).stem)
    widget = ScarceWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Scarce segmentation")
    widget.model.value = args.model
    worker = widget.run()
    done = []
    worker.finished.connect(lambda: done.append(True))
    while not done:
        QApplication.processEvents()
        time.sleep(0.05)
    for _ in range(20):
        QApplication.processEvents()
    viewer.layers[f"{Path(args.model).name} classes"].visible = False  # instances show more
    viewer.reset_view()
    for _ in range(20):
        QApplication.processEvents()
    iio.imwrite(args.out, viewer.screenshot(canvas_only=False, flash=False))
    print(f"wrote {args.out}")
    viewer.close()


if __name__ == "__main__":
    main()
