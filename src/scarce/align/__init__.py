"""Alignment of serial-section EM stacks: a task of the training engine (see the README).

Displacement-field conventions, the alignment task, stack readers, losses, defects, applying
and evaluating live here; the field network is ``fieldnet`` in :mod:`scarce.models`.
"""
