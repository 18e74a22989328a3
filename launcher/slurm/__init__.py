"""SLURM on the launcher side: SLURM's variables read into our contract, nothing else needed.

    srun -N2 --ntasks-per-node=2 python -m disttrain.worker run.yaml      # one task per worker
    srun -N2 --ntasks-per-node=1 python -m launcher.slurm.agent --nproc-per-node 2 -m disttrain.worker run.yaml

One module per concern, leaves first:

- ``errors``    :class:`SlurmEnvError`, the one error of this wing.
- ``hostlist``  ``gpu[01-03,07]`` and ``2(x3),1`` expanded (SLURM's order, zero padding).
- ``place``     one srun task's :class:`SlurmPlace` read and cross-checked from ``SLURM_*``;
                the store's address and port; the contract variables a worker gets.
- ``secret``    the job secret: from the environment, a 0600 file of ours (owner and mode
                checked before it is trusted), or a file rank 0 writes in a shared directory.
- ``signals``   signal names, and a warning signal caught while torch still imports.
- ``requeue``   ``scontrol requeue`` (array task alone), else resubmitting the batch script.
- ``worker``    srun mode: ``setup_worker()``, called by every srun-started worker.
- ``agent``     agent mode: ``python -m launcher.slurm.agent``, one agent per node.

The submit side (sbatch templates, ``disttrain submit``, the preemption callback) lives in
``disttrain.slurm``. Nothing here imports torch or disttrain.
"""
