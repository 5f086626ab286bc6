"""The solver: settings (:mod:`.config`), the faithful reference loop (:mod:`.reference`), the fast
engine (:mod:`.engine`, :mod:`.inverter`), warm starts (:mod:`.warm_start`) and the self-check."""
