"""Tasks with an exact answer: each a packaged prompt set and a reward that checks it.

- ``distrl.data.tasks.arithmetic``: small sums and differences, scored by
  ``distrl.data.tasks.arithmetic:correct``; run it with the ``arithmetic`` config.
"""
