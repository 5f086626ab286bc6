"""The solver: settings (:mod:`.config`), the run's checked inputs (:mod:`.inputs`), the faithful
reference loop (:mod:`.reference`), the fast engine's parts (:mod:`.engine`), the guarded fast
path (:mod:`.fast_path`), the :class:`~.inverter.Inverter` that runs either backend
(:mod:`.inverter`), warm starts (:mod:`.warm_start`) and the ``crossgap selfcheck`` command
(:mod:`.selfcheck`)."""
