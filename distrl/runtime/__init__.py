"""What every role and the loop share on Ray: actor options and restarts, fault kinds,
the crew of handles, checkpoints, the learner's and worker's common parts."""
