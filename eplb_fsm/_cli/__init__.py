"""The ``eplb-fsm`` command line (``plan``, ``simulate``, ``diagram``) and the
load and placement file formats it reads and writes.
"""
