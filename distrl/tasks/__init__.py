"""Tasks with an exact answer: each a packaged prompt set and a reward that checks it.

- ``distrl.tasks.arithmetic``: small sums and differences, scored by
  ``distrl.tasks.arithmetic:correct``; run it with the ``arithmetic`` config.
"""
