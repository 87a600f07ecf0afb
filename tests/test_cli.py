"""The `fashionbert` command line's manners: --version, a --help that imports no torch, a subcommand's own usage on a
bad option, exit codes by error; and the log lines and progress an operator reads (fashionbert/logs.py)."""
from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

import pytest

from fashionbert import logs
from fashionbert.commands import cli, synth
from fashionbert.errors import EXIT_BUSY, EXIT_USAGE, Busy, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|DEBUG|WARNING|ERROR) [\w.]+: ")


@pytest.fixture(autouse=True)
def restore_logging():
    """setup_logging changes the process's root logger: put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    ours = {name: logging.getLogger(name).level for name in logs.OUR_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in ours.items():
        logging.getLogger(name).setLevel(lvl)


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})


# ============================================================================================ command line
def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert re.fullmatch(r"fashionbert \d+\.\d+\S*\n", capsys.readouterr().out)


def test_help_and_usage_mistakes_import_no_torch():
    proc = _python(
        "import sys\n"
        "from fashionbert.commands.cli import main\n"
        "codes = []\n"
        "for argv in (['--help'], [], ['retreive'], ['--bogus']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        codes.append(e.code)\n"
        "heavy = [m for m in ('torch', 'transformers', 'apache_beam', 'faiss') if m in sys.modules]\n"
        "print(codes, heavy)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[0, 2, 2, 2] []"
    assert "retrieve" in proc.stdout and "score-pairs" in proc.stdout  # the help lists the subcommands
    assert "invalid choice: 'retreive'" in proc.stderr


def test_import_fashionbert_registers_with_the_auto_classes_once_they_are_used():
    proc = _python(
        "import sys\n"
        "import fashionbert\n"
        "assert 'torch' not in sys.modules\n"
        "from transformers import PreTrainedModel  # loads the auto classes from inside transformers' own imports\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "from transformers.models.auto.modeling_auto import MODEL_MAPPING\n"
        "from fashionbert.model.config import FashionBertConfig\n"
        "print('fashionbert' in CONFIG_MAPPING, MODEL_MAPPING[FashionBertConfig].__name__)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "FashionBertModel"]


def test_a_bad_option_shows_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["retrieve", "--features", "F", "--model", "M", "--out", "O", "--bogus"])
    assert exit_.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("usage: fashionbert retrieve ") and "--recall-k" in err
    assert "fashionbert retrieve: error: unrecognized arguments: --bogus" in err


@pytest.mark.parametrize("error, code", [(UserError("--out x: no such folder"), EXIT_USAGE),
                                         (Busy("--workdir w is locked by pid 1"), EXIT_BUSY)])
def test_exit_code_follows_the_error(monkeypatch, capsys, tmp_path, error, code):
    def fail(config):
        raise error

    monkeypatch.setattr(synth, "run", fail)
    assert cli.main(["synth", "--out", str(tmp_path)]) == code
    assert f"fashionbert synth: error: {error}" in capsys.readouterr().err


def test_a_stage_logs_a_start_and_an_end_line(capsys, tmp_path):
    assert cli.main(["synth", "--out", str(tmp_path / "cat"), "--products", "3"]) == 0
    lines = [l for l in capsys.readouterr().err.splitlines() if LOG_LINE.match(l)]
    assert any(l.endswith(f"INFO fashionbert.commands.synth: synth: start out={tmp_path / 'cat'}") for l in lines)
    assert any(re.search(r"synth: done in \d+\.\d s: 3 products$", l) for l in lines)


# ============================================================================================ logs
def test_log_lines_have_time_level_and_logger():
    stream = io.StringIO()
    logs.setup_logging(stream=stream)
    logging.getLogger("fashionbert.rank.retrieve").info("retrieve: start")
    logging.getLogger("fashionbert.rank.retrieve").debug("hidden unless --verbose")
    logging.getLogger("apache_beam").info("chatty")
    logging.getLogger("apache_beam").warning("apitools not found; Dataflow only")
    logging.getLogger("apache_beam").warning("needs action")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and all(LOG_LINE.match(l) for l in lines)
    assert lines[0].endswith(" INFO fashionbert.rank.retrieve: retrieve: start")
    assert lines[1].endswith(" WARNING apache_beam: needs action")

    logs.setup_logging(verbose=True, stream=stream)  # replaces the handler: no line twice
    logging.getLogger("fashionbert.train").debug("now shown")
    assert stream.getvalue().splitlines()[2:] == [stream.getvalue().splitlines()[2]]
    assert stream.getvalue().splitlines()[2].endswith("DEBUG fashionbert.train: now shown")


def test_progress_off_a_terminal_logs_counts_then_a_final_line(caplog):
    caplog.set_level(logging.INFO, logger="fashionbert.progress")
    with logs.progress(10, "score pairs", "pairs", interval=0) as shown:  # pytest's stderr is not a terminal
        assert isinstance(shown, logs.LogProgress)
        shown.update(4)
        shown.set_postfix_str("loss 0.5")
        shown.update(6)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert re.fullmatch(r"score pairs: 4/10 pairs \(40%\), [\d.]+ pairs/s, eta \d+ s", messages[0])
    assert messages[1].startswith("score pairs: 10/10 pairs (100%)") and messages[1].endswith("| loss 0.5")
    assert re.fullmatch(r"score pairs: 10/10 pairs \(100%\), [\d.]+ pairs/s \| loss 0.5; done in [\d.]+ s", messages[2])


def test_progress_waits_for_its_interval_and_can_be_silent(caplog):
    caplog.set_level(logging.INFO, logger="fashionbert.progress")
    now = [0.0]
    shown = logs.LogProgress(100, "train", "steps", interval=30, initial=20, clock=lambda: now[0])
    for t in (10.0, 29.0, 31.0, 40.0):
        now[0] = t
        shown.update(1)
    shown.close()
    shown.close()
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "train: 23/100 steps (23%), 0.1 steps/s, eta 796 s"  # at 31 s: 3 steps in 31 s, 77 to go
    assert len(messages) == 2 and messages[1].endswith("done in 40.0 s")

    caplog.clear()
    with logs.progress(5, "quiet", enabled=False) as silent:
        silent.update(5)
    assert caplog.records == []


# ============================================================================================ the stages' log lines
def test_train_retrieve_and_score_pairs_log_start_progress_and_end(capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fashionbert.model.patch_cnn import FEATURE_DIM
    from tests.fake_features import make_tiny_backbone, write_fake_features
    from tests.test_train import cli_args

    features = write_fake_features(tmp_path / "features", n_products=12, images_per_product=2,
                                   feature_dim=FEATURE_DIM, n_image_shards=1, row_group_size=8)
    backbone = make_tiny_backbone(tmp_path / "tiny-bert")
    assert cli.main(["train", *cli_args(features, tmp_path / "train", backbone, "--steps", 3, "--checkpoint-every", 0,
                                        "--prefetch", 0, "--val-every", 0)]) == 0
    model = tmp_path / "train" / "model"
    assert cli.main(["retrieve", "--features", str(features), "--model", str(model), "--out", str(tmp_path / "tables"),
                     "--top-k", "3", "--recall-k", "5", "--device", "cpu", "--index", "torch"]) == 0
    pq.write_table(pa.table({"product_id": ["p00001", "p00002"], "image_id": ["p00001-0", "p00003-1"]}),
                   tmp_path / "pairs.parquet")
    assert cli.main(["score-pairs", "--features", str(features), "--model", str(model), "--pairs",
                     str(tmp_path / "pairs.parquet"), "--out", str(tmp_path / "scored.csv"), "--no-progress"]) == 0
    lines = [l.split(": ", 1)[1] for l in capsys.readouterr().err.splitlines() if LOG_LINE.match(l)]

    def one(pattern: str) -> str:
        found = [l for l in lines if re.fullmatch(pattern, l)]
        assert len(found) == 1, (pattern, lines)
        return found[0]

    one(rf"train: start features={features} out={tmp_path / 'train'}")
    one(r"train: 3/3 steps \(100%\), [\d.]+ steps/s \| loss .*; done in [\d.]+ s")  # pytest's stderr: no terminal
    one(r"train: done in [\d.]+ s: step 3/3, \d+ training images, \d+ held out")
    one(rf"retrieve: start features={features} model={model} out={tmp_path / 'tables'}")
    one(r"embed texts: 12/12 texts \(100%\), .*done in [\d.]+ s")
    one(r"embed images: 24/24 images \(100%\), .*done in [\d.]+ s")
    n = int(one(r"retrieve: done in [\d.]+ s: 12 text queries, 24 image queries, (\d+) pairs scored").split()[-3])
    one(rf"score pairs: {n}/{n} pairs \(100%\), .*done in [\d.]+ s")
    one(r"score pairs: 2/2 pairs \(100%\), .*done in [\d.]+ s")
    one(r"score-pairs: done in [\d.]+ s: 2 pairs: 2 scored, 0 rejected")
