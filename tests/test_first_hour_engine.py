"""Issue 18 item 3, for engines: ``kvmesh engine --config`` reads the file ``kvmesh up`` reads — its [engine]
table, and [supervisor] run_dir and base_port — with flags over it and vLLM flags after ``--`` added to the
table's ``extra_args``.  Runs against the stand-in vLLM of ``tests/test_first_hour.py``."""

from __future__ import annotations

import pathlib
import signal
import subprocess

from tests.helpers import free_port_block, wait_until
from tests.test_first_hour import KVMESH, _get_json, fake_env, fake_vllm  # noqa: F401  (fake_vllm: a fixture)


def test_engine_takes_the_config_file(tmp_path: pathlib.Path, tiny_model: pathlib.Path,
                                      fake_vllm: pathlib.Path) -> None:  # noqa: F811
    port = free_port_block(1)
    conf = tmp_path / "k.toml"
    conf.write_text(f'[engine]\nmodel = "{tiny_model}"\nserved_model_name = "from-file"\n'
                    'extra_args = ["--max-num-seqs", "8"]\n'
                    f'[supervisor]\nbase_port = {port}\nrun_dir = "{tmp_path / "run"}"\n[cache]\nenabled = false\n')
    env = fake_env(fake_vllm, tmp_path / "marks")
    proc = subprocess.Popen([*KVMESH, "engine", "--config", str(conf), "--", "--enforce-eager"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_until(lambda: _get_json(f"http://127.0.0.1:{port}/env") is not None, 60, "the engine on base_port")
        argv = (_get_json(f"http://127.0.0.1:{port}/env") or {})["argv"]
        assert isinstance(argv, list) and argv[-3:] == ["--max-num-seqs", "8", "--enforce-eager"]
        assert argv[argv.index("--served-model-name") + 1] == "from-file"
        assert (tmp_path / "run" / "engine-0.log").is_file()  # [supervisor] run_dir
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out


def test_engine_flags_override_the_file_and_a_model_is_needed(tmp_path: pathlib.Path) -> None:
    conf = tmp_path / "k.toml"
    conf.write_text("[gateway]\nport = 8000\n")
    r = subprocess.run([*KVMESH, "engine", "--config", str(conf)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == ("kvmesh: error: give --model DIR (or a --config file with an "
                                                      "[engine] table naming the model)")
    conf.write_text('[engine]\nmodel = "/nonexistent"\nkind = "sim"\n')
    r = subprocess.run([*KVMESH, "engine", "--config", str(conf), "--model", str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    # the flag won over the file's model: the simulated engine looked for a tokenizer in tmp_path
    assert r.returncode == 2 and f"--model {tmp_path}: no tokenizer.json there" in r.stderr, r.stderr
