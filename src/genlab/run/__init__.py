"""The run's lifecycle: everything between a command that names a run and the folder it leaves
behind. ``plan`` resolves what the run computes (its config checked first by ``checks``) and
``runs`` takes the run folder on it; ``runtime`` says what the running command is (Hydra's choices,
a sweep job or not, the first process) and ``ranks`` how the processes of one run start and end
together; ``outputs`` writes every file atomically; ``checkpoints`` reads and writes checkpoints
and checks that a resume can continue one, and ``trust`` parses, as data, whatever genlab reads
that it did not just write; ``stopping`` takes every signal down one path and ``resume`` says what
was saved and the command that continues it."""
