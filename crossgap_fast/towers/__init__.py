"""The frozen CLIP towers as the inversion sees them, with pseudo tokens / pseudo patches put in.

* :mod:`.template`: making the OTI text template (the placeholder, tokenising once, length
  checks); the :class:`~.text.TextTemplate` it returns lives with the text tower.
* :mod:`.blocks`: the transformer-block machinery both towers share (support check, one block
  run on cast weights, against a shared prefix, for only the rows needed).
* :mod:`.text` / :mod:`.vision`: each tower's support check, its plain forward (the reference
  backend's ground truth) and its fast forward (the engine's), side by side.
"""
