"""The `rlfuse` command: --help everywhere, user errors as one line (exit 2), data checked before
the model loads, model.path checks, the installed entry point."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlfuse.engine import cli
from rlfuse.engine.cli import main

RLFUSE = Path(sys.executable).parent / "rlfuse"  # the console script of this environment
TINY = ["model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=32",
        "device=cpu", "progress=false"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- --help
@pytest.mark.parametrize("argv, expected", [
    (["train", "grpo", "--help"], ["--grpo.loss.beta", "KL-to-reference coefficient in the loss",
                                   "(type: float, default: 0.0)", "--config CONFIG",
                                   "--resume", "(type: int, default: 8)"]),
    (["train", "dpo", "-h"], ["--dpo.loss.loss_type", "pairs per optimizer step",
                              "(type: Optional[str], default: null)"]),
    (["train", "ppo", "--help"], ["separate: own copy of the initial backbone"]),
    (["demo", "--help"], ["operand digits", "(type: int, default: 2)", "--quick"]),
    (["bench", "engine", "--help"], ["GRPO completions per step", "(type: int, default: 8)"]),
    (["train", "--help"], ["rlfuse train {sft,grpo,dpo,ppo}", "GRPO and its variants"]),
    (["--help"], ["rlfuse train", "rlfuse bench engine", "exits with status 2"]),
])
def test_help(argv, expected, capsys):
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # help text wraps lines
    for text in expected:
        assert " ".join(text.split()) in out, text


def test_bench_help_lists_types_and_defaults(capsys):
    with pytest.raises(SystemExit) as exc:  # argparse exits after --help
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "timed calls (median reported) (type: int, default: 10)" in out


# ----------------------------------------------------------------------------- user errors
def _user_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.strip().splitlines()
           if not x.startswith("rlfuse: WARNING")]
    assert len(err) == 1 and err[0].startswith("rlfuse: error: "), err
    return err[0]


def test_config_errors_are_one_line(tmp_path, capsys):
    assert "no such config file" in _user_error(["train", "sft", "--config", "nope.yaml"], capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nsft: {data: [x\n")
    assert f"{bad}:3: YAML syntax error" in _user_error(["train", "sft", "--config", str(bad)],
                                                         capsys)
    msg = _user_error(["train", "grpo", "grpo.rollout.rewards=[{name: nope}]"], capsys)
    assert "unknown reward 'nope'" in msg
    msg = _user_error(["train", "sft", "stepz=3"], capsys)
    assert "unknown config key 'stepz'; valid keys here: ['algo', 'steps'" in msg
    assert "'algo' is 'dpo'" in _user_error(["train", "sft", "algo=dpo"], capsys)


def test_data_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr("rlfuse.engine.trainer.load_policy", no_model)
    lines = tmp_path / "d.jsonl"
    lines.write_text('{"prompt": "1+1=", "completion": "2"}\n\n["not", "an", "object"]\n')
    msg = _user_error(["train", "sft", f"sft.data={lines}"], capsys)
    assert f"{lines}:3: expected a JSON object" in msg and "sft.data" in msg
    missing = _jsonl(tmp_path / "m.jsonl", [{"prompt": "x"}])
    assert "missing string field(s) ['completion']" in _user_error(
        ["train", "sft", f"sft.data={missing}"], capsys)
    assert "no such data file" in _user_error(["train", "dpo", "dpo.data=nope.jsonl"], capsys)
    assert "grpo needs data: set grpo.data" in _user_error(["train", "grpo"], capsys)
    pairs = _jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "b"}])
    assert "ppo.reward_model.pairs" in _user_error(
        ["train", "ppo", f"ppo.data={pairs}", f"ppo.reward_model.pairs={lines}"], capsys)


def test_overlong_dpo_prompt_names_max_length_and_records(tmp_path, capsys):
    pairs = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        {"prompt": "12+34+56=", "chosen": "102", "rejected": "101"}])
    msg = _user_error(["train", "dpo", f"dpo.data={pairs}", "max_length=8",
                       f"out_dir={tmp_path / 'run'}"] + TINY, capsys)
    assert "records [2]" in msg and "max_length=8" in msg and "longest 10" in msg


@pytest.mark.parametrize("path", ["./no/such/model", "runs_that_do_not_exist/a/b", "~/nope-xyz"])
def test_missing_local_model_folder(tmp_path, capsys, path):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    msg = _user_error(["train", "sft", f"sft.data={data}", f"model.path={path}",
                       f"out_dir={tmp_path / 'run'}"] + TINY, capsys)
    assert msg == f"rlfuse: error: no such folder: {path} (config key model.path)"


def test_a_folder_without_config_json_is_not_a_model(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    msg = _user_error(["train", "sft", f"sft.data={data}", f"model.path={tmp_path}"] + TINY,
                      capsys)
    assert "has no config.json" in msg


def test_train_runs_and_warns_about_the_random_model(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "completion": "2"}] * 4)
    out = tmp_path / "run"
    assert main(["train", "sft", f"sft.data={data}", "steps=1", "sft.batch_size=2",
                 f"out_dir={out}", "keep_checkpoints=0"] + TINY) == 0
    cap = capsys.readouterr()
    assert "WARNING: model.path is not set" in cap.err
    assert "sft finished at step 1" in cap.out
    assert (out / "config.yaml").exists()


def test_a_local_model_folder_loads_without_the_hub(tmp_path, capsys):
    from rlfuse.engine.config import ModelConfig
    from rlfuse.engine.model import char_tokenizer, tiny_model

    tok = char_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model(ModelConfig(hidden_size=32, num_layers=1, intermediate_size=32),
               tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "completion": "2"}] * 2)
    assert main(["train", "sft", f"sft.data={data}", f"model.path={model_dir}", "steps=1",
                 "sft.batch_size=2", f"out_dir={tmp_path / 'run'}", "keep_checkpoints=0",
                 "device=cpu", "progress=false"]) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_bugs_keep_their_traceback(monkeypatch):
    monkeypatch.setattr(cli, "train", lambda argv: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["train", "sft"])


# ----------------------------------------------------------------------------- packaging
ROOT = Path(__file__).resolve().parents[1]


def _kernels_expected() -> str:
    """The file a bare `import kernels` should load from the repository root: Hugging Face's
    installed `kernels` (found on sys.path without the root) when there is one, else kernels/
    (which then hands back rlfuse itself)."""
    import importlib.machinery

    spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if Path(p or ".").resolve() != ROOT])
    return spec.origin if spec is not None else str(ROOT / "kernels/__init__.py")


def test_kernels_found_by_path_is_an_installed_package():
    """From the repository root (the working directory on sys.path, as under `python -c` or
    `python -m pytest`), kernels/ is importable as `kernels`, and transformers imports that name
    for Hugging Face's kernels library. The import hands back that library when it is installed,
    else rlfuse itself: never a second copy of rlfuse, so the custom ops are registered once and
    keep working, whichever name comes first."""
    import rlfuse

    assert Path(rlfuse.__file__).parent.name == "kernels"  # the editable install's mapping
    op = ("x, w = torch.randn(3, 8), torch.randn(5, 8)\n"
          "print(kernels.__file__, rlfuse.linear_logprobs(x, w, torch.tensor([0, 4, 2])).shape)\n")
    for first in ("import kernels, rlfuse, torch\n", "import rlfuse, kernels, torch\n"):
        out = subprocess.run([sys.executable, "-c", first + op], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout
        assert out.split() == [_kernels_expected(), "torch.Size([3])"]


@pytest.mark.parametrize("run_as", ["script", "module"])
def test_engine_does_not_import_benches_and_kernels_is_not_this_folder(tmp_path, run_as):
    """Run from the repository root as the `rlfuse` script is, and as `python -m` is (the root on
    sys.path, where kernels/ is a bare `kernels`): the engine imports no benches, and building a
    transformers model (which imports Hugging Face's `kernels`) loads no second copy of kernels/
    and gets the installed `kernels`, if it imports one."""
    probe = (
        "import sys\n"
        "import rlfuse, rlfuse.engine.cli, rlfuse.engine.demo, rlfuse.engine.trainer\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "Qwen2ForCausalLM(Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8,\n"
        "                             num_hidden_layers=1, num_attention_heads=2,\n"
        "                             num_key_value_heads=1))\n"
        "copies = [n for n, m in list(sys.modules.items())\n"
        "          if getattr(m, '__file__', None) == rlfuse.__file__ and m is not rlfuse]\n"
        "print(sorted(m for m in sys.modules if m.startswith('rlfuse.benches')), copies,\n"
        "      getattr(sys.modules.get('kernels'), '__file__', None))\n")
    if run_as == "script":
        script = tmp_path / "probe.py"
        script.write_text(probe)
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-c", probe]  # '' (the working directory) first on sys.path
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    benches, copies, kernels = out.strip().rsplit(" ", 2)
    assert (benches, copies) == ("[]", "[]")
    assert kernels in ("None", _kernels_expected())


def test_installed_entry_point(tmp_path):
    """The real `rlfuse` script, run from the repository root: help, and a user error as one
    line with exit status 2."""
    proc = subprocess.run([str(RLFUSE), "train", "grpo", "--help"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0 and "--grpo.rollout.samples_per_prompt" in proc.stdout
    proc = subprocess.run([str(RLFUSE), "train", "sft", f"sft.data={tmp_path / 'x.jsonl'}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"rlfuse: error: no such data file: {tmp_path / 'x.jsonl'} "
                                   "(config key sft.data)")


def test_help_into_a_closed_pipe_prints_no_traceback():
    """`rlfuse train grpo --help | head -1`: the reader has left before the help is written."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([str(RLFUSE), "train", "grpo", "--help"], stdout=write_end,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
