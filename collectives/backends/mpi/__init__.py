"""MPI through mpi4py (``backend``), and the PMI server (``pmi``) that rank 0 starts when no MPI launcher did."""
