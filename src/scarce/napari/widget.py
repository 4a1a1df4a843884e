"""The napari widget: pick a model and an image layer, run it in a background thread.

The model is a Scarce checkpoint or run folder, or a bioimage.io package; prediction
(:func:`scarce.napari.run.predict_layers`) runs in a ``thread_worker`` so the viewer stays
responsive, and its class map, instances and probabilities are added as layers with the image
layer's scale and translation.
"""

from __future__ import annotations

import napari
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, PushButton, SpinBox
from napari.qt.threading import thread_worker

from scarce.napari.run import predict_layers


class ScarceWidget(Container):
    """Run a Scarce model (or bioimage.io package) on the chosen image layer.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        The viewer (npe2 passes it).

    Attributes
    ----------
    worker : napari.qt.threading.FunctionWorker or None
        The last prediction's worker (tests wait on it).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.model = FileEdit(label="model", mode="r", filter="*.pt *.zip *.yaml")
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.instances = CheckBox(text="instances", value=True)
        self.tile_size = SpinBox(label="tile (0: model's)", min=0, max=8192, step=32, value=0)
        self.button = PushButton(text="Segment")
        self.status = Label(value="")
        self.worker = None
        self.extend([self.model, self.image, self.instances, self.tile_size, self.button])
        self.append(self.status)
        self.button.changed.connect(self.run)
        napari_viewer.layers.events.inserted.connect(self.image.reset_choices)
        napari_viewer.layers.events.removed.connect(self.image.reset_choices)

    def _image_layers(self, _widget=None) -> list[str]:
        return [
            layer.name for layer in self.viewer.layers if isinstance(layer, napari.layers.Image)
        ]

    def run(self, _value=None):
        """Start prediction on the chosen layer in a background thread; returns the worker."""
        if not self.image.value:
            self.status.value = "no image layer"
            return None
        layer = self.viewer.layers[self.image.value]
        place = {"scale": tuple(layer.scale[-2:]), "translate": tuple(layer.translate[-2:])}
        self.status.value = f"segmenting {layer.name} ..."
        self.button.enabled = False
        worker = thread_worker(predict_layers)(
            self.model.value,
            layer.data,
            rgb=bool(layer.rgb),
            instances=self.instances.value,
            tile_size=self.tile_size.value or None,
        )
        worker.returned.connect(lambda layers: self._add(layers, place))
        worker.errored.connect(self._failed)
        worker.finished.connect(lambda: setattr(self.button, "enabled", True))
        self.worker = worker
        worker.start()
        return worker

    def _add(self, layers: list[tuple], place: dict) -> None:
        for data, kwargs, kind in layers:
            getattr(self.viewer, f"add_{kind}")(data, **{**place, **kwargs})
        self.status.value = f"added {len(layers)} layer(s)"

    def _failed(self, exc: Exception) -> None:
        self.status.value = f"error: {exc}"


__all__ = ["ScarceWidget"]
