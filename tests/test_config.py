import subprocess
import sys

import pytest

from lcrec_chat.config import Config, ConfigError, load_config


def test_defaults_then_yaml_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("run_dir: runs/x\ntrain:\n  lr: 0.001\n  batch_size: 4\n")
    cfg = load_config(preset, ["train.lr=5e-5", "data.max_users=7"])
    assert cfg.run_dir == "runs/x"
    assert cfg.train.batch_size == 4            # from YAML
    assert cfg.train.lr == pytest.approx(5e-5)   # override beats YAML
    assert cfg.data.max_users == 7
    assert cfg.train.lora_r == Config().train.lora_r   # untouched default


def test_each_phase_is_the_train_section_with_its_keys_replaced():
    from lcrec_chat.config import train_phases
    cfg = load_config(None, ["train.seed=1", "train.task_budget={seqrec: 10, chat: 5}", "train.init_adapter=a/adapter",
                             "train.phases=[{seed: 2, task_budget: {seqrec: 3}}, {lr: 1.0e-5}]"])
    first, second, third = train_phases(cfg)
    assert first.phases == [] and first.seed == 1 and first.init_adapter == "a/adapter"   # it may start from one
    assert second.seed == 2 and second.task_budget == {"seqrec": 3} and second.lr == first.lr
    assert second.init_adapter == "" and third.seed == 1 and third.lr == pytest.approx(1e-5)
    assert third.task_budget == {"seqrec": 10, "chat": 5} and cfg.train.task_budget == {"seqrec": 10, "chat": 5}
    assert train_phases(Config()) == [Config().train]


@pytest.mark.parametrize("text, fragment", [
    ("trian:\n  lr: 1\n", "unknown config key 'trian'"),
    ("train:\n  learning_rate: 1\n", "unknown config key 'train.learning_rate'"),
    ("train:\n  batch_size: big\n", "train.batch_size: expected a number"),
    ("train:\n  batch_size: 2.5\n", "expected an integer"),
    ("train: 3\n", "'train' is a section"),
    ("train:\n  phases: [{lr: 1.0e-4, sead: 4}]\n", "unknown config key 'train.phases[0].sead'"),
    ("train:\n  phases: [{seed: 1}, {init_adapter: runs/x/adapter}]\n", "'train.phases[1].init_adapter' cannot"),
    ("train:\n  phases: [{seed: many}]\n", "train.phases[0].seed: expected a number"),
    ("train:\n  phases: [3]\n", "train.phases[0]: expected a mapping"),
    ("- a\n- b\n", "expected a mapping at the top level"),
    ("train: [\n", "not valid YAML"),
    ("eval:\n  styles: [dense, chta]\n", "eval.styles[1]: 'chta' is not one of 'dense', 'chat', 'seqrec'"),
    ("model:\n  dtype: fp16\n", "model.dtype: 'fp16' is not one of 'auto', 'fp32', 'bf16', 'int8', 'nf4'"),
    ("train:\n  autocast: yes\n", "train.autocast: True is not one of"),
])
def test_bad_config_names_the_problem(tmp_path, text, fragment):
    preset = tmp_path / "bad.yaml"
    preset.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        load_config(preset)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'model.nonsense'"):
        load_config(None, ["model.nonsense=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")



def test_unreadable_values_and_files_are_config_errors_not_tracebacks(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'train.lr=\[1,': the value is not valid YAML"):
        load_config(None, ["train.lr=[1,"])
    for value in (".inf", "-.inf", ".nan"):
        with pytest.raises(ConfigError, match="train.lora_r: expected a finite number"):
            load_config(None, [f"train.lora_r={value}"])
    with pytest.raises(ConfigError, match="it is a folder"):
        load_config(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("run_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not a UTF-8 text file"):
        load_config(tmp_path / "latin1.yaml")


def test_an_override_inside_a_mapping_sets_that_entry_only():
    default = Config().train.task_budget
    cfg = load_config(None, ["train.task_budget.chat=0"])
    assert cfg.train.task_budget == {**default, "chat": 0} and len(default) > 1
    assert load_config(None, ["train.task_budget={seqrec: 5}"]).train.task_budget == {"seqrec": 5}   # the whole
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(None, ["train.task_budget.chat=lots"])

def test_every_shipped_preset_loads_and_round_trips(tmp_path):
    from pathlib import Path
    for preset in sorted(Path("configs").glob("*.yaml")):
        cfg = load_config(preset)
        cfg.save(tmp_path / "resolved.yaml")
        assert load_config(tmp_path / "resolved.yaml") == cfg, preset


def test_cli_reports_config_errors_and_has_help():
    out = subprocess.run([sys.executable, "-m", "lcrec_chat", "prepare", "--set", "data.colour=red"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown config key 'data.colour'" in out.stderr
    for stage in ("prepare", "index", "train", "evaluate", "pipeline", "serve"):
        help_text = subprocess.run([sys.executable, "-m", "lcrec_chat", stage, "--help"],
                                   capture_output=True, text=True)
        assert help_text.returncode == 0 and "example: python -m lcrec_chat" in help_text.stdout
