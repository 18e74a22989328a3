"""SLURM on the training side: batch scripts, ``disttrain submit``, and preemption.

- ``script``      sbatch scripts rendered from a template (package data in ``templates/``,
                  loaded with importlib.resources, so a wheel carries them) and the config;
                  every value is quoted for where it lands (an ``#SBATCH`` line or the shell).
- ``submit``      ``disttrain submit``: resolve the config, write it and the script, ``sbatch``.
- ``preemption``  the trainer callback: a warning signal becomes one agreed stop step, a
                  checkpoint, a requeue and exit 0.
- ``templates/``  ``single_node``, ``multi_node``, ``job_array``; the top-level ``slurm/``
                  folder of the repository holds identical copies for users who copy by hand.

The launcher side (SLURM's variables, the job secret, srun and agent modes, requeue) is
``launcher.slurm``; the ``slurm:`` config section is ``disttrain.config.SlurmConfig``.
"""
