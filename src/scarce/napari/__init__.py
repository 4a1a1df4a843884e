"""napari plugin (npe2): a widget that runs a Scarce model or a bioimage.io package on an
image layer, and a reader for Scarce's outputs. Install with ``pip install 'scarce[napari]'``;
the manifest is ``napari.yaml`` beside this file.
"""
