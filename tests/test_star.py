import numpy as np
import pytest

from cryosgd.data.particles import read_particles, write_particles
from cryosgd.errors import InputError
from cryosgd.io.star import read_star

from conftest import FIXTURES


def test_star30_and_star31_describe_the_same_particles():
    p30 = read_particles(FIXTURES / "relion30.star")
    p31 = read_particles(FIXTURES / "relion31.star")
    assert p30.pixel_A == p31.pixel_A == 1.5
    np.testing.assert_allclose(p30.shift_A, p31.shift_A)
    np.testing.assert_allclose(p30.angles_deg, p31.angles_deg)
    np.testing.assert_allclose(p30.per_particle("voltage_kV"), [300, 300, 200])
    np.testing.assert_allclose(p31.per_particle("amplitude_contrast"), [0.1, 0.1, 0.07])
    np.testing.assert_array_equal(p31.random_subset, [1, 2, 1])
    assert p31.optics[1].name == "group two" and p31.optics[0].box_px == 16
    assert p30.extra["rlnMicrographName"] == ["mic1.mrc", "mic1.mrc", "mic2.mrc"]


@pytest.mark.parametrize("name", ["relion30.star", "relion31.star"])
def test_round_trip_through_star31_keeps_every_value(tmp_path, name):
    before = read_particles(FIXTURES / name)
    write_particles(tmp_path / "out.star", before)
    after = read_particles(tmp_path / "out.star")
    for field in ("angles_deg", "shift_A", "defocus_u_A", "defocus_v_A", "defocus_angle_deg",
                  "phase_shift_deg", "optics_group", "random_subset"):
        np.testing.assert_allclose(getattr(after, field), getattr(before, field), err_msg=field)
    assert after.image_name == before.image_name and after.extra == before.extra
    assert after.optics == before.optics
    assert set(read_star(tmp_path / "out.star")) == {"optics", "particles"}


def test_star30_pixel_size_can_be_given(tmp_path):
    (tmp_path / "p.star").write_text(
        "data_\nloop_\n_rlnAngleRot #1\n_rlnAngleTilt #2\n_rlnAnglePsi #3\n_rlnOriginX #4\n"
        "1 2 3 1.5\n4 5 6 -1\n")
    with pytest.raises(InputError, match="pixel size"):
        read_particles(tmp_path / "p.star")
    table = read_particles(tmp_path / "p.star", pixel_A=2.0)
    np.testing.assert_allclose(table.shift_A, [[3.0, 0.0], [-2.0, 0.0]])
    assert not table.has_ctf


def _drop_column(tmp_path, column):
    text = (FIXTURES / "relion31.star").read_text()
    head, body = text.split("data_particles")
    lines = body.splitlines()
    names = [l for l in lines if l.startswith("_")]
    k = [l.split()[0] for l in names].index(column)
    out = []
    for l in lines:
        if l.startswith("_"):
            if l.split()[0] != column:
                out.append(l)
        elif l.startswith("0000"):
            words = l.split()
            out.append(" ".join(words[:k] + words[k + 1:]))
        else:
            out.append(l)
    (tmp_path / "p.star").write_text(head + "data_particles" + "\n".join(out))
    return tmp_path / "p.star"


def test_missing_pose_column_names_file_and_column(tmp_path):
    with pytest.raises(InputError, match=r"p\.star: missing column rlnAngleTilt"):
        read_particles(_drop_column(tmp_path, "_rlnAngleTilt"))
    (tmp_path / "nopose.star").write_text("data_\nloop_\n_rlnImageName #1\n1@a.mrcs\n")
    without_poses = read_particles(tmp_path / "nopose.star", pixel_A=1.0)
    with pytest.raises(InputError, match=r"nopose\.star: missing column rlnAngleRot"):
        without_poses.require_poses()


@pytest.mark.parametrize("old,new,message", [
    (" 1 2 0.0\n", " 1 3 0.0\n", "rlnRandomSubset: value 3"),
    ("12000.0 11000.0", "nan 11000.0", "rlnDefocusU"),
    ("0.0 0.75 1 2", "0.0 0.75 7 2", "rlnOpticsGroup: value 7"),
    (" 1 2 0.0\n", " 1 2\n", "12 values for 13 columns"),
    (None, "hello\n", "before the first data_"),
])
def test_bad_values_are_one_line_errors(tmp_path, old, new, message):
    text = (FIXTURES / "relion31.star").read_text()
    (tmp_path / "bad.star").write_text(new if old is None else text.replace(old, new))
    with pytest.raises(InputError, match=message):
        read_particles(tmp_path / "bad.star")
