"""`hpcllm doctor`: print the environment report; exit 1 if Horovod cannot initialise."""
import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--all-ranks", is_flag=True, help="Under mpirun/srun, print every rank's report (default: rank 0 only).")
def doctor(as_json, all_ranks):
    """Report Python, torch/CUDA, MPI, mpi4py, Horovod build and init, h5py/HDF5, Slurm and
    the rank layout. Run it under mpirun or srun to see how ranks land on nodes."""
    from hpcllm.doctor import format_report, run_doctor
    from hpcllm.parallel.topology import Topology

    checks = run_doctor()
    topo = Topology.from_env()
    if all_ranks or topo.rank == 0:
        click.echo(format_report(checks, as_json))
    failed = [c.name for c in checks if not c.ok]
    if any(name.startswith("horovod") for name in failed):
        raise SystemExit(1)
