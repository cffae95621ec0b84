"""The distributor's workflow: issue personal copies, attribute images, trace colluders.

See ``docs/distributor.md``. Plain functions live in ``copies``, ``attribution`` and
``generation``; ``tasks`` maps the Hydra config onto them for the command line.
"""
