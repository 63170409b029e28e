"""The run folder's id: the default one never collides with an existing run folder."""

from lorafit.run.experiment import default_experiment_id


def test_default_id_of_a_second_run_in_the_same_second_is_a_new_folder(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("settings: {}\n")
    root = tmp_path / "experiments"
    first = default_experiment_id(config, root)
    (root / first).mkdir(parents=True)
    (root / f"{first}_2").mkdir()  # a third run in the same second gets _3
    second = default_experiment_id(config, root)
    assert second != first and not (root / second).exists()
    assert second.startswith(first.rsplit("_", 1)[0])  # still sortable: timestamp first, then the config hash
