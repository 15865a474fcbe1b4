"""Packaging, spec validation and the CLI's usage errors."""

from __future__ import annotations

import os

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeslim.search import demo_spec, load_spec, parse_spec
from edgeslim.search.cli import main
from edgeslim.spaces import SpecError

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_no_bare_top_level_modules_and_lean_search_import():
    out = _run("import sys, edgeslim.search, edgeslim.spaces, edgeslim.objectives; "
               "print(sorted(m for m in sys.modules if m.split('.')[0] in ('search','spaces','objectives')));"
               "print('plotly' in sys.modules)")
    assert out.split("\n")[:2] == ["[]", "False"]


def test_search_package_import_does_not_pull_torch():
    assert _run("import sys, edgeslim.search.cli; print('torch' in sys.modules, 'plotly' in sys.modules)").strip() == "False False"


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "search" in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "choose a command" in capsys.readouterr().err


def test_demo_spec_file_equals_embedded_demo():
    assert load_spec(ROOT / "studies" / "digits-demo.toml") == demo_spec()
    assert load_spec(ROOT / "studies" / "digits-resnet.toml").model.builtin == "digits-resnet"


@pytest.mark.parametrize("data,match", [
    ({"study": {"trials": "3"}}, "study.trials must be int, got str"),
    ({"study": {"tirals": 3}}, "unknown key study.tirals"),
    ({"model": {"builtin": "digits-cnn", "widht": 3}}, "unknown key study.model.widht"),
    ({"bogus": {}}, "unknown section \\[bogus\\]"),
    ({"study": {"sampler": "cmaes"}}, "unknown sampler 'cmaes'"),
    ({"model": {"builtin": "alexnet9"}}, "unknown built-in model 'alexnet9'"),
    ({"model": {"torchvision": "resnet18"}, "data": {"image_folder": "imgs"}}, "input_shape"),
    ({"model": {"torchvision": "resnet18"}}, "\\[data\\] needs image_folder"),
    ({"space": {"rules": {"_default": {"bits": [16]}}}}, "bits must be a non-empty subset"),
    ({"space": {"rules": {"_default": {"sparsity": "half"}}}}, "must be a list of float"),
    ({"study": {"objectives": ["energy_mj"]}}, "needs 'latency_ms'"),
    # a weights file or a data source next to a built-in model is refused, never ignored
    ({"model": {"builtin": "digits-cnn", "checkpoint": "r18.pt"}}, "checkpoint 'r18.pt' next to builtin"),
    ({"model": {"builtin": "digits-cnn"}, "data": {"factory": "baddata:data"}},
     "factory = 'baddata:data' next to \\[model\\] builtin"),
    ({"model": {"builtin": "digits-resnet"}, "data": {"image_folder": "imgs"}}, "image_folder = 'imgs' next to"),
])
def test_bad_specs_name_the_bad_value(data, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(data)


def test_malformed_toml(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[study\nname = 1")
    with pytest.raises(SpecError, match="malformed TOML"):
        load_spec(bad)
    assert main(["search", str(bad)]) == 2
    assert "malformed TOML" in capsys.readouterr().err


def test_missing_spec_file(capsys):
    assert main(["search", "no/such/spec.toml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_sampler_flag(capsys, tmp_path):
    assert main(["search", "--sampler", "cmaes", "--out", str(tmp_path)]) == 2
    assert "unknown sampler 'cmaes'" in capsys.readouterr().err


def test_unknown_torchvision_model(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('[study]\nname = "x"\n[model]\ntorchvision = "resnet9000"\ninput_shape = [3, 32, 32]\n'
                    f'[data]\nimage_folder = "{tmp_path}"\n')
    assert main(["search", str(spec), "--out", str(tmp_path / "o")]) == 2
    assert "unknown model 'resnet9000'" in capsys.readouterr().err


def test_missing_data_path(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('[study]\nname = "x"\n[model]\ntorchvision = "resnet18"\ninput_shape = [3, 32, 32]\n'
                    'num_classes = 3\n[data]\nimage_folder = "/no/such/folder"\n')
    assert main(["search", str(spec), "--out", str(tmp_path / "o")]) == 2
    assert "data path '/no/such/folder' does not exist" in capsys.readouterr().err


def test_unknown_model_factory(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('[study]\nname = "x"\n[model]\nfactory = "no_such_pkg_xyz:make"\ninput_shape = [1, 8, 8]\n'
                    '[data]\nfactory = "no_such_pkg_xyz:data"\n')
    assert main(["search", str(spec), "--out", str(tmp_path / "o")]) == 2
    assert "cannot import module 'no_such_pkg_xyz'" in capsys.readouterr().err


def test_impossible_space_from_cli(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('[study]\nname = "x"\n[model]\nbuiltin = "digits-cnn"\ntrain_epochs = 1\n'
                    '[space.rules._default]\nfreeze = true\n')
    assert main(["search", str(spec), "--out", str(tmp_path / "o")]) == 2
    assert "nothing to search" in capsys.readouterr().err


def test_workload_flag_on_the_demo_keeps_only_the_default_rule():
    import argparse

    from edgeslim.search._cli_study import _spec_from_args

    args = argparse.Namespace(spec=None, workload="digits-resnet", name=None, trials=None, storage=None,
                              sampler=None, seed=None, out=None, device=None, threads=None, score=None)
    spec = _spec_from_args(args)
    assert spec.model.builtin == "digits-resnet" and spec.name == "digits-resnet"
    assert list(spec.space.rules) == ["_default"]  # features.0 / classifier.3 are the demo CNN's layers


def test_bad_trials_flag(capsys):
    assert main(["search", "--trials", "0"]) == 2
    assert "--trials must be >= 1" in capsys.readouterr().err


PG_URL = os.environ.get("EDGESLIM_TEST_POSTGRES_URL", "")


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "broken.json").write_text("{not json")
    (tmp / "list.json").write_text("[1, 2, 3]")
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "tpu.toml").write_text('[study]\nname = "t"\n[finetune]\ndevice = "tpu"\n')
    (tmp / "cuda.toml").write_text('[study]\nname = "t"\n[finetune]\ndevice = "cuda"\n')
    missing = str(tmp / "no-such-study")
    return [
        (["search", str(tmp / "none.toml")], "does not exist"),
        (["search", "--device", "no-such-device", "--out", str(tmp / "s")], "unknown device 'no-such-device'"),
        (["inventory", str(tmp / "none.toml")], "does not exist"),
        (["refine", missing], "does not exist"),
        (["pick", missing, "--max-latency-ms", "1"], "does not exist"),
        (["pick", str(tmp / "empty"), "--min-accuracy", "2"], "min_accuracy"),
        (["export", missing, "--trial", "0"], "does not exist"),
        (["export", str(tmp / "empty"), "--trial", "0"], "holds no study.db"),
        (["calibrate", "--device", "x", "--fit", str(tmp / "broken.json")], "not valid JSON"),
        (["calibrate", "--device", "x", "--fit", str(tmp / "list.json")], "holds a list"),
        (["calibrate", "--device", "x", "--fit", str(tmp / "none.json")], "does not exist"),
        (["check-latency", "--device", "no-such-device"], "unknown device 'no-such-device'"),
        (["variants", missing], "does not exist"),
        (["search", "--jobs", "0"], "--jobs must be >= 1"),
        (["search", "--jobs", "2", "--storage", "sqlite:///:memory:"], "needs storage that several processes share"),
        (["search", "--out", str(tmp / "s"), "--storage", "postgresql+psycopg://me:secret@127.0.0.1:1/db"],
         "cannot open storage postgresql+psycopg://me:***@127.0.0.1:1/db"),
        (["search", "--out", str(tmp / "s"), "--storage", f"sqlite:///{tmp}/no/such/folder/s.db"],
         "does not exist"),
        (["search", str(tmp / "tpu.toml"), "--out", str(tmp / "s")], "[finetune] device must be"),
        (["worker"], "worker needs a SPEC or --storage"),
        (["worker", "--storage", f"sqlite:///{tmp}/empty.db", "--name", "nope"], "no study 'nope'"),
        (["worker", "--torch-threads", "0"], "--torch_threads must be >= 1"),
        (["refine", missing, "--storage", "postgresql+psycopg://me:secret@127.0.0.1:1/db"], "does not exist"),
    ] + ([(["search", str(tmp / "cuda.toml"), "--out", str(tmp / "s")], "sees no CUDA device")]
         if not _has_cuda() else []) + ([
        (["search", "--out", str(tmp / "s"), "--storage", PG_URL.rsplit("/", 1)[0] + "/no_such_db"],
         "cannot open storage"),
    ] if PG_URL else [])


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_every_command_refuses_bad_input_with_one_line_and_exit_2(tmp_path, capsys):
    for argv, match in _bad_inputs(tmp_path):
        code = main(argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("edgeslim: error:")]
        assert code == 2, (argv, code, err)
        assert len(errors) == 1 and match in errors[0], (argv, err)
        assert "Traceback" not in err and "secret" not in err


FACTORIES = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset

def broken():
    raise RuntimeError("weights file missing")

def training():
    return nn.Linear(4, 3)

def fine():
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()

def data():
    x, y = torch.randn(20, 4), torch.arange(20) % 3
    return TensorDataset(x, y), TensorDataset(x, y), 3

def wide_data():
    x, y = torch.randn(20, 7), torch.arange(20) % 3
    return TensorDataset(x, y), TensorDataset(x, y), 3
'''


@pytest.mark.parametrize("model,data,match", [
    ("broken", "data", "model factory 'userfac:broken' raised RuntimeError: weights file missing"),
    ("training", "data", "returned a model in training mode"),
    ("fine", "wide_data", "cannot run the data's first sample (shape [1, 7]"),
])
def test_user_factories_fail_in_one_line(tmp_path, monkeypatch, capsys, model, data, match):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "userfac.py").write_text(FACTORIES)
    (tmp_path / "s.toml").write_text(f'[study]\nname = "x"\n[model]\nfactory = "userfac:{model}"\n'
                                     f'[data]\nfactory = "userfac:{data}"\n')
    assert main(["search", "s.toml", "--out", "o", "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_image_folder_without_class_folders_is_label_free_and_scored_as_agreement(tmp_path):
    from PIL import Image

    from edgeslim.search._workloads import load_workload

    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(imgs / f"{i:02d}.png")
    (imgs / "notes.txt").write_text("not an image")
    spec = parse_spec({"study": {"name": "x"}, "model": {"torchvision": "mobilenet_v3_small", "input_shape": [3, 32, 32]},
                       "data": {"image_folder": str(imgs), "val_fraction": 0.3}})
    w = load_workload(spec, tmp_path / "o", log=lambda _s: None)
    assert w.data.label_free and w.data.num_classes == 1000  # the model's outputs
    assert (len(w.data.train), len(w.data.val)) == (7, 3)  # the .txt is not an image
    assert w.base_accuracy == 1.0  # the dense model agrees with itself
    assert tuple(w.example_input.shape) == (1, 3, 32, 32)


def test_empty_image_folder_names_what_it_needs(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    spec = tmp_path / "s.toml"
    spec.write_text('[study]\nname = "x"\n[model]\ntorchvision = "resnet18"\ninput_shape = [3, 32, 32]\n'
                    f'[data]\nimage_folder = "{tmp_path / "imgs"}"\n')
    assert main(["search", str(spec), "--out", str(tmp_path / "o")]) == 2
    assert "holds neither class sub-folders nor images" in capsys.readouterr().err
