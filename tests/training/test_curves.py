"""zray.training.curves: a fit's training curves, one panel per logged metric."""

from PIL import Image

from zray.training.curves import save_curves


def test_one_panel_per_logged_key_in_order(tmp_path):
    history = [{"step": 1, "loss": 2.0, "kl": 0.1}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0, "kl": 0.3}]
    assert save_curves(tmp_path / "a.png", history, ("loss", "reward_mean", "kl"), "teacher GDSO")
    assert save_curves(tmp_path / "b.png", history, ("loss",), "teacher GDSO")
    wide, narrow = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert wide.size == (640, 280) and narrow.size == (320, 280)  # 3.2 x 2.8 inches a panel at 100 dpi


def test_nothing_written_without_a_logged_key(tmp_path):
    assert not save_curves(tmp_path / "c.png", [{"step": 1, "loss": 1.0}], ("kl",), "x")
    assert not save_curves(tmp_path / "d.png", [], ("loss",), "x")
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "d.png").exists()
