"""When the CLI re-executes itself with glibc malloc tunables (`uniperceiver_cli.cli.allocator`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uniperceiver_cli.cli.allocator import OPT_OUT, TUNED, tuned_environment

REPO = Path(__file__).resolve().parents[3]


def _decide(args: list[str], **environ: str) -> dict[str, str] | None:
    return tuned_environment(args, {"PATH": "/bin", **environ}, "linux", "glibc")


@pytest.mark.parametrize(
    "command", ["pretrain", "finetune", "prompt-tune", "eval", "zero-shot", "export"]
)
def test_heavy_commands_get_the_tunables_and_keep_the_environment(command: str) -> None:
    env = _decide([command, "recipe.yaml", "--json"], RANK="1")
    assert env == {"PATH": "/bin", "RANK": "1", "GLIBC_TUNABLES": TUNED}


def test_global_options_before_the_command_are_skipped() -> None:
    assert _decide(["-v", "pretrain", "r.yaml"]) is not None


@pytest.mark.parametrize(
    ("args", "environ"),
    [
        (["validate", "r.yaml"], {}),
        (["recipes", "list"], {}),
        (["score", "captions", "a.json", "b.json"], {}),
        ([], {}),
        (["--version"], {}),
        (["pretrain", "--help"], {}),
        (["eval", "-h"], {}),
        (["pretrain", "r.yaml"], {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}),
        (["pretrain", "r.yaml"], {"GLIBC_TUNABLES": ""}),
        (["pretrain", "r.yaml"], {OPT_OUT: "1"}),
        (["pretrain", "r.yaml"], {OPT_OUT: "yes"}),
    ],
)
def test_no_reexec_for_light_commands_help_user_settings_or_opt_out(
    args: list[str], environ: dict[str, str]
) -> None:
    assert _decide(args, **environ) is None


def test_opt_out_set_to_zero_keeps_the_tuning() -> None:
    assert _decide(["pretrain", "r.yaml"], **{OPT_OUT: "0"}) is not None


@pytest.mark.parametrize(("system", "libc"), [("darwin", ""), ("win32", ""), ("linux", "")])
def test_only_linux_with_glibc(system: str, libc: str) -> None:
    assert tuned_environment(["pretrain", "r.yaml"], {}, system, libc) is None


def test_a_run_started_without_tunables_records_the_tuned_ones(tmp_path: Path) -> None:
    """End to end: `python -m uniperceiver_cli pretrain` with GLIBC_TUNABLES unset re-executes
    itself, trains and records the tunables it ran with in env.json."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "uniperceiver_cli",
        "pretrain",
        str(REPO / "recipes" / "pretrain" / "tiny_toy.yaml"),
        "--set",
        "schedule.max_steps=2",
        "--set",
        "schedule.warmup_steps=1",
        "-o",
        str(run),
        "--json",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["ok"] is True
    assert json.loads((run / "env.json").read_text())["malloc_tunables"] == TUNED
