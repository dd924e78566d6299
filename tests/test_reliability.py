"""Bad and hostile input: no data loss, one-line errors before any work, safe resumes and locks.

Each case runs the real command line and checks the exit code, that the message is one line
naming the file or option and the value, and that nothing was written.
"""

import os
import subprocess
import sys
import textwrap

import mrcfile
import numpy as np
import pytest
import torch

from cryosgd.data.particles import read_particles, write_particles
from cryosgd.data.stack import ImageStack
from cryosgd.io.mrc import write_map
from cryosgd.io.outputs import LOCK_FILE
from cryosgd.sim.phantom import blob_phantom
from cryosgd.sim.simulate import SimulationSettings, simulate

from conftest import random_particles, run_cli


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_map(root / "truth.mrc", blob_phantom(16, seed=2), 3.0)
    simulate(root / "truth.mrc", root / "sim", SimulationSettings(n_particles=60, snr=1.0, seed=1))
    return root / "sim" / "particles.star"


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _one_line_error(code, out, *expected):
    assert code == 2, out
    assert out.startswith("error: ") and out.strip().count("\n") == 0, out
    for text in expected:
        assert text in out, out


# 1. No silent data loss ------------------------------------------------------------------

def test_project_to_a_star_name_is_refused_and_writes_nothing(tmp_path):
    write_map(tmp_path / "map.mrc", blob_phantom(16, seed=1), 2.0)
    write_particles(tmp_path / "in.star", random_particles(4, 16, 2.0))
    code, out = run_cli("project", tmp_path / "map.mrc", tmp_path / "in.star", "-o", tmp_path / "X.star")
    _one_line_error(code, out, "X.star", "must end in .mrcs")
    assert _files(tmp_path) == ["in.star", "map.mrc"]


def test_project_never_replaces_the_input_particle_stack(dataset, tmp_path):
    before = (dataset.parent / "particles.mrcs").read_bytes()
    code, out = run_cli("project", dataset.parent / "ground_truth.mrc", dataset, "-o", dataset.parent / "particles.mrcs")
    _one_line_error(code, out, "would overwrite the input")
    code, out = run_cli("project", dataset.parent / "ground_truth.mrc", dataset, "-o", dataset.parent / "particles.mrcs",
                        "--force")
    _one_line_error(code, out, "would overwrite the input")
    assert (dataset.parent / "particles.mrcs").read_bytes() == before


def test_existing_outputs_are_replaced_only_with_force(tmp_path):
    write_map(tmp_path / "map.mrc", blob_phantom(16, seed=1), 2.0)
    write_particles(tmp_path / "in.star", random_particles(4, 16, 2.0))
    args = ["project", tmp_path / "map.mrc", tmp_path / "in.star", "-o", tmp_path / "p.mrcs"]
    assert run_cli(*args)[0] == 0
    stamp = (tmp_path / "p.mrcs").stat().st_mtime_ns
    _one_line_error(*run_cli(*args), "p.mrcs", "exists; use --force")
    assert (tmp_path / "p.mrcs").stat().st_mtime_ns == stamp
    assert run_cli(*args, "--force")[0] == 0


def test_a_folder_holding_another_programs_files_is_not_overwritten(tmp_path):
    write_map(tmp_path / "map.mrc", blob_phantom(16, seed=1), 2.0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "particles.star").write_text("precious")
    args = ["simulate", tmp_path / "map.mrc", "-o", tmp_path / "out", "-n", 4]
    _one_line_error(*run_cli(*args), "particles.star", "--force")
    assert (tmp_path / "out" / "particles.star").read_text() == "precious"
    assert run_cli(*args, "--force")[0] == 0
    assert run_cli(*args, "--seed", 3)[0] == 0  # the folder's own previous run may be replaced


def test_simulate_refuses_to_overwrite_its_own_input_map(tmp_path):
    (tmp_path / "sim").mkdir()
    write_map(tmp_path / "sim" / "ground_truth.mrc", blob_phantom(16, seed=1), 2.0)
    before = (tmp_path / "sim" / "ground_truth.mrc").read_bytes()
    code, out = run_cli("simulate", tmp_path / "sim" / "ground_truth.mrc", "-o", tmp_path / "sim", "-n", 4, "--force")
    _one_line_error(code, out, "would overwrite the input")
    assert (tmp_path / "sim" / "ground_truth.mrc").read_bytes() == before


# 2. Physical values validated where they enter -------------------------------------------

def _star_with(dataset, tmp_path, **changes):
    table = read_particles(dataset)
    table.image_name = [f"{n.split('@')[0]}@{dataset.parent / n.split('@')[1]}" for n in table.image_name]
    for name, value in changes.items():
        if name == "pixel_A":
            table.optics = [type(g)(g.name, g.voltage_kV, g.cs_mm, g.amplitude_contrast, value, g.box_px)
                            for g in table.optics]
        elif name == "rows":
            table = table.subset(np.arange(value))
    write_particles(tmp_path / "edited.star", table)
    return tmp_path / "edited.star"


@pytest.mark.parametrize("pixel", [-1.5, 0.0])
def test_a_star_pixel_size_that_is_not_positive_is_refused(dataset, tmp_path, pixel):
    star = _star_with(dataset, tmp_path, pixel_A=pixel)
    _one_line_error(*run_cli("reconstruct", star, "-o", tmp_path / "out"), "edited.star", "rlnImagePixelSize",
                    f"value {pixel:g}")
    assert not (tmp_path / "out").exists()


def test_an_empty_particle_table_is_refused(dataset, tmp_path):
    star = _star_with(dataset, tmp_path, rows=0)
    _one_line_error(*run_cli("reconstruct", star, "-o", tmp_path / "out"), "edited.star", "no rows")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,expected", [
    (["--pixel-size", "0"], "argument --pixel-size: 0: must be > 0"),
    (["--pixel-size", "-2"], "argument --pixel-size: -2: must be > 0"),
    (["--batch-size", "0"], "argument --batch-size: 0: must be ≥ 1"),
    (["--box", "0"], "argument --box: 0: must be ≥ 1"),
    (["--box", "33"], "--box 33: the working box must be even"),
    (["--box", "2"], "--box 2: the working box must be even, at least 4"),
    (["--epochs", "-1"], "argument --epochs: -1: must be ≥ 0"),
    (["--method", "newton"], "argument --method: invalid choice: 'newton'"),
    (["--threads", "0"], "argument --threads: 0: must be ≥ 1"),
])
def test_bad_reconstruct_options_are_one_line_errors(dataset, tmp_path, args, expected):
    _one_line_error(*run_cli("reconstruct", dataset, "-o", tmp_path / "out", *args), expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("box", [33, 2])
def test_images_of_an_unusable_box_blame_the_stack_not_an_option(tmp_path, box):
    with mrcfile.new(tmp_path / "odd.mrcs") as mrc:
        mrc.set_data(np.zeros((3, box, box), dtype=np.float32))
        mrc.voxel_size = 2.0
    table = random_particles(3, box, 2.0, names="odd.mrcs")
    write_particles(tmp_path / "odd.star", table)
    code, out = run_cli("reconstruct", tmp_path / "odd.star", "-o", tmp_path / "out")
    _one_line_error(code, out, "odd.mrcs", f"images of {box} px", "even box")
    assert "--box" not in out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,expected", [
    (["-n", "0"], "argument -n/--particles: 0: must be ≥ 1"),
    (["--pixel-size", "0", "--box", "16"], "argument --pixel-size: 0: must be > 0"),
    (["--snr", "0"], "argument --snr: 0: must be > 0"),
    (["--defocus-min", "20000", "--defocus-max", "5000"], "--defocus-max 5000.0: must be ≥ --defocus-min 20000.0"),
    (["-n", "1000000000000"], "-n 1000000000000: the stack needs"),
])
def test_bad_simulate_values_are_refused_before_anything_is_allocated(tmp_path, args, expected):
    write_map(tmp_path / "map.mrc", blob_phantom(16, seed=1), 2.0)
    _one_line_error(*run_cli("simulate", tmp_path / "map.mrc", "-o", tmp_path / "out", *args), expected)
    assert not (tmp_path / "out").exists()


def test_an_atomic_model_needs_an_even_box(tmp_path):
    from importlib import resources
    pdb = resources.files("cryosgd") / "data" / "1ubq.pdb"
    _one_line_error(*run_cli("simulate", pdb, "-o", tmp_path / "out", "--box", 33, "--pixel-size", 1.0),
                    "--box: images of 33 px")


@pytest.mark.parametrize("args,expected", [
    (["--pad", "0"], "argument --pad: 0: must be ≥ 1"),
    (["--batch-size", "0"], "argument --batch-size: 0: must be ≥ 1"),
])
def test_bad_project_options(tmp_path, args, expected):
    write_map(tmp_path / "map.mrc", blob_phantom(16, seed=1), 2.0)
    write_particles(tmp_path / "in.star", random_particles(4, 16, 2.0))
    _one_line_error(*run_cli("project", tmp_path / "map.mrc", tmp_path / "in.star", "-o", tmp_path / "p.mrcs",
                             *args), expected)
    assert _files(tmp_path) == ["in.star", "map.mrc"]


def test_hessian_batch_size_0_is_refused(dataset, tmp_path):
    _one_line_error(*run_cli("hessian", dataset, "-o", tmp_path / "h", "--batch-size", 0),
                    "argument --batch-size: 0: must be ≥ 1")


def _map(path, volume, voxel_A):
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.asarray(volume, dtype=np.float32))
        mrc.voxel_size = voxel_A


def test_a_missing_star_file_or_map_is_said_the_same_way(tmp_path):
    write_map(tmp_path / "map.mrc", blob_phantom(16, seed=1), 2.0)
    _one_line_error(*run_cli("reconstruct", tmp_path / "nothere.star", "-o", tmp_path / "out"),
                    f"{tmp_path / 'nothere.star'}: file not found")
    _one_line_error(*run_cli("flip", tmp_path / "nothere.mrc", "-o", tmp_path / "f.mrc"),
                    f"{tmp_path / 'nothere.mrc'}: file not found")


@pytest.mark.parametrize("case,expected", [
    ("zero_map", "b.mrc: all zero"),
    ("zero_mask", "mask.mrc: all zero"),
    ("voxel_sizes", "b.mrc: voxel size 3 Å differs from"),
    ("mask_voxel", "mask.mrc: voxel size 3 Å differs from"),
    ("voxel_zero", "a.mrc: voxel size 0 Å in the header"),
])
def test_fsc_refuses_maps_it_cannot_compare(tmp_path, case, expected):
    volume = blob_phantom(16, seed=1)
    _map(tmp_path / "a.mrc", volume, 0.0 if case == "voxel_zero" else 2.0)
    _map(tmp_path / "b.mrc", 0 * volume if case == "zero_map" else volume, 3.0 if case == "voxel_sizes" else 2.0)
    _map(tmp_path / "mask.mrc", 0 * volume if case == "zero_mask" else 1 + 0 * volume, 3.0 if case == "mask_voxel" else 0.0)
    _one_line_error(*run_cli("fsc", tmp_path / "a.mrc", tmp_path / "b.mrc", "--mask", tmp_path / "mask.mrc"), expected)


def test_project_refuses_a_map_without_voxel_size(tmp_path):
    _map(tmp_path / "map.mrc", blob_phantom(16, seed=1), 0.0)
    write_particles(tmp_path / "in.star", random_particles(4, 16, 2.0))
    _one_line_error(*run_cli("project", tmp_path / "map.mrc", tmp_path / "in.star", "-o", tmp_path / "p.mrcs"),
                    "map.mrc: voxel size 0 Å")


# 3. Resume only what was started; one run per folder -------------------------------------

@pytest.fixture(scope="module")
def finished_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    code, text = run_cli("reconstruct", dataset, "-o", out, "--epochs", 1, "--batch-size", 20)
    assert code == 0, text
    return out


def _folder_state(out):
    """Each file's bytes and modification time (but the lock's, which names its last holder)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir()) if p.name != LOCK_FILE}


def _resume(star, out, *extra):
    """A refused resume leaves the folder as it was (checkpoint, run.json and all)."""
    before = _folder_state(out)
    code, text = run_cli("reconstruct", star, "-o", out, "--epochs", 2, "--batch-size", 20, "--resume", *extra)
    assert _folder_state(out) == before
    return code, text


def test_resume_refuses_a_checkpoint_made_from_another_star_file(dataset, finished_run, tmp_path):
    import shutil
    shutil.copytree(finished_run, tmp_path / "r")
    other = _star_with(dataset, tmp_path)  # the same particles, but another file
    _one_line_error(*_resume(other, tmp_path / "r"), "checkpoint.pt", "--resume: made from another STAR file")


def test_resume_refuses_a_checkpoint_with_other_settings(dataset, finished_run, tmp_path):
    import shutil
    shutil.copytree(finished_run, tmp_path / "r")
    _one_line_error(*_resume(dataset, tmp_path / "r", "--method", "pcg"),
                    "--resume: made with other settings (method algorithm1 → pcg)")


def test_resume_refuses_a_star_file_edited_since(dataset, tmp_path):
    star = _star_with(dataset, tmp_path)
    assert run_cli("reconstruct", star, "-o", tmp_path / "r", "--epochs", 1, "--batch-size", 20)[0] == 0
    table = read_particles(star)
    table.defocus_u_A[0] += 100
    write_particles(star, table)
    _one_line_error(*_resume(star, tmp_path / "r"), "--resume: made from another particle table")


def test_resume_without_a_checkpoint_says_so(dataset, tmp_path):
    _one_line_error(*run_cli("reconstruct", dataset, "-o", tmp_path / "new", "--resume"), "no checkpoint here")


def test_a_second_run_into_a_locked_folder_is_refused(dataset, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from cryosgd.io.outputs import OutputFolder
        with OutputFolder({str(tmp_path / 'out')!r}, "reconstruct", []):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, out = run_cli("reconstruct", dataset, "-o", tmp_path / "out")
        _one_line_error(code, out, f"another cryosgd run (process {holder.pid}) is writing into this folder")
        assert not (tmp_path / "out" / "checkpoint.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_cli("reconstruct", dataset, "-o", tmp_path / "out", "--epochs", 0)[0] == 0  # released on exit


# 4. Output paths checked before the work starts -------------------------------------------

def _no_image_may_be_read(monkeypatch):
    def read(self, index):
        raise AssertionError("an image was read before the output path was checked")
    monkeypatch.setattr(ImageStack, "read", read)


def test_an_output_folder_that_is_a_file_is_reported_before_any_image_is_read(dataset, tmp_path, monkeypatch):
    (tmp_path / "out").write_text("a file")
    _no_image_may_be_read(monkeypatch)
    _one_line_error(*run_cli("reconstruct", dataset, "-o", tmp_path / "out"), "out: -o: exists and is not a folder")
    _one_line_error(*run_cli("reconstruct", dataset, "-o", tmp_path / "out" / "sub"), "cannot create the folder")


def test_an_unwritable_output_folder_is_reported_before_any_image_is_read(dataset, tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    if os.geteuid() != 0:
        (tmp_path / "locked").chmod(0o555)
    else:  # root may write anywhere: make the folder look read-only as it would to a user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path / "locked")
                            else real_access(path, mode))
    _no_image_may_be_read(monkeypatch)
    _one_line_error(*run_cli("reconstruct", dataset, "-o", tmp_path / "locked"), "locked: -o: folder is not writable")


def test_a_stack_path_that_is_a_folder_is_refused(tmp_path):
    write_map(tmp_path / "map.mrc", blob_phantom(16, seed=1), 2.0)
    write_particles(tmp_path / "in.star", random_particles(4, 16, 2.0))
    (tmp_path / "p.mrcs").mkdir()
    _one_line_error(*run_cli("project", tmp_path / "map.mrc", tmp_path / "in.star", "-o", tmp_path / "p.mrcs"),
                    "p.mrcs: -o: is a folder")


def test_outputs_get_the_permissions_of_the_umask(dataset, tmp_path):
    old = os.umask(0o022)
    try:
        assert run_cli("reconstruct", dataset, "-o", tmp_path / "r", "--epochs", 0)[0] == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "r").iterdir()}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes


# 5, 6. Devices and Ctrl-C -----------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this build has CUDA")
def test_cuda_on_a_cpu_build_lists_the_devices_that_exist(dataset, tmp_path):
    _one_line_error(*run_cli("reconstruct", dataset, "-o", tmp_path / "out", "--device", "cuda"),
                    "--device cuda: not available", "available: cpu")
    _one_line_error(*run_cli("reconstruct", dataset, "-o", tmp_path / "out", "--device", "gpu0"),
                    "--device gpu0: not a device name; available: cpu")
    assert not (tmp_path / "out").exists()


def test_ctrl_c_leaves_nothing_half_written_and_says_so(tmp_path, monkeypatch):
    import cryosgd.sim.project as project
    write_map(tmp_path / "map.mrc", blob_phantom(16, seed=1), 2.0)
    write_particles(tmp_path / "in.star", random_particles(4, 16, 2.0))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(project, "project_into", interrupted)
    code, out = run_cli("project", tmp_path / "map.mrc", tmp_path / "in.star", "-o", tmp_path / "p.mrcs")
    assert code == 130 and out.strip() == "interrupted: nothing was left half-written; run the command again to redo it"
    assert _files(tmp_path) == ["in.star", "map.mrc"]


def test_ctrl_c_names_the_checkpoint_to_resume_from_also_in_a_stage_folder(tmp_path):
    """A run stopped after a checkpoint says how to continue; ``auto`` keeps its stages'
    checkpoints in subfolders, and the newest of them is the one named."""
    from cryosgd.cli import _interrupted, build_parser
    argv = ["auto", "p.star", "-o", str(tmp_path / "out"), "--force"]
    args = build_parser().parse_args(argv)
    assert _interrupted(args, argv).startswith("interrupted: nothing was left half-written")
    for seconds, stage in enumerate(("old_reconstruction", "abinitio", "refine", "newer_unrelated")):
        (tmp_path / "out" / stage).mkdir(parents=True)
        (tmp_path / "out" / stage / "checkpoint.pt").write_bytes(b"")
        os.utime(tmp_path / "out" / stage / "checkpoint.pt", (1e9 + seconds, 1e9 + seconds))
    line = _interrupted(args, argv)  # the newest of auto's stages' checkpoints, not another folder's
    assert str(tmp_path / "out" / "refine" / "checkpoint.pt") in line, line
    assert line.endswith(f"continue with: cryosgd auto p.star -o {tmp_path / 'out'} --resume"), line


def test_ctrl_c_exits_at_once_whatever_threads_are_still_working():
    """After the one line, the process leaves with 130 without waiting for (or finalising
    under) a background thread that Ctrl-C stopped mid-work."""
    script = textwrap.dedent("""
        import threading
        import cryosgd.cli as cli

        def interrupted(argv=None):
            threading.Thread(target=threading.Event().wait).start()  # never ends, not a daemon
            return 130

        cli.main = interrupted
        cli.entry_point()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 130, result.stderr


# 8. What users read ---------------------------------------------------------------------------

def test_help_and_bad_choices_answer_without_importing_torch():
    script = ("import sys\nfrom cryosgd.cli import main\n"
              "try:\n    main(['reconstruct', 'x.star', '-o', 'y', '--method', 'newton'])\n"
              "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr
    help_text = subprocess.run([sys.executable, "-m", "cryosgd", "reconstruct", "--help"], capture_output=True,
                               text=True).stdout
    assert "{algorithm1,sgd,exact-diag,running-diag,cg,pcg}" in help_text and "<bool>" not in help_text
    assert "--resume " in help_text and "--force " in help_text
