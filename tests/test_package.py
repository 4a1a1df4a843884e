"""The package's public API: every name in ``scarce.__all__`` resolves."""

import scarce


def test_every_public_name_resolves():
    for name in scarce.__all__:
        assert getattr(scarce, name) is not None, name
    assert scarce.Trainer.__module__ == "scarce.train"
    assert callable(scarce.predict_files) and callable(scarce.build_model)
